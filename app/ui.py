"""The page: tabs Data, Tune, Ask, Inspect, Compare, and the wiring of their events. Every event
has an api_name, so everything the page does can also be done from gradio_client."""
from __future__ import annotations

import os

import gradio as gr

from app import handlers as h
from app import views
from core.data.media import DEFAULT_FRAMES, IMAGE_TYPES, VIDEO_TYPES
from core.data.samples import SAMPLES_ROOT
from core.pet import make_config
from core.pet.vlpet import GRANULARITIES
from core.trainer import bf16_supported, pick_device

# A shared Space stays responsive: at most this many tunings run at once, the rest wait in the queue.
TUNING_CONCURRENCY = int(os.environ.get("PETSTUDIO_TUNING_CONCURRENCY", "1"))
QUEUE_SIZE = int(os.environ.get("PETSTUDIO_QUEUE_SIZE", "32"))
MAX_UPLOAD = os.environ.get("PETSTUDIO_MAX_UPLOAD", "200mb")
MEDIA_TYPES = [*IMAGE_TYPES, *VIDEO_TYPES]
DATA_TYPES = [".zip", ".csv", ".jsonl", *MEDIA_TYPES]
CAPTION_COLUMNS = ["rank", "score", "caption of", "caption"]
CSS = """
.petstudio-header h1 { margin-bottom: 0; }
.petstudio-status { font-family: ui-monospace, monospace; }
"""

INTRO = """<div class="petstudio-header">

# PET Studio
Few-shot, parameter-efficient tuning of vision-language models: bring a small image-text or
video-text set, tune a tiny fraction of a CLIP or BLIP model with **Aurora** or **VL-PET** (or LoRA,
adapters, prompts, BitFit, a linear probe, full fine-tuning), then ask the frozen and the tuned
model side by side and see where the parameters sit and what the gates learned.
</div>"""


def build_demo() -> gr.Blocks:
    aurora, lora, vlpet, adapter, prompt = (make_config(m) for m in ("aurora", "lora", "vlpet", "adapter", "prompt"))
    with gr.Blocks(title="PET Studio", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                with gr.Row():
                    with gr.Column(scale=1):
                        sample = gr.Dropdown(list(h.DATASETS), value=next(iter(h.DATASETS)), label="Bundled sample set")
                        load_sample = gr.Button("Load sample set", variant="primary")
                        upload = gr.File(label="…or upload a .zip, or captions.csv / data.jsonl with its media",
                                         file_count="multiple", file_types=DATA_TYPES)
                        load_upload = gr.Button("Load upload")
                    with gr.Column(scale=2):
                        stats = gr.Markdown("No dataset yet: load a sample set or upload one.")
                        report = gr.Markdown()
                preview = gr.Gallery(label="Preview (captions and questions)", columns=6, height=420,
                                     object_fit="contain")

            with gr.Tab("Tune", id="tune"):
                with gr.Row():
                    with gr.Column(scale=1):
                        model = gr.Dropdown(h.BACKBONES, value="offline", allow_custom_value=True,
                                            label="Backbone (or type any openclip:NAME:TAG, blip:HUB_ID, a local path)")
                        model_note = gr.Markdown(h.model_notice("offline"))
                        task = gr.Radio(["retrieval", "vqa"], value="retrieval", label="Task")
                        method = gr.Dropdown(h.METHOD_LABELS, value="aurora", label="Method")
                        with gr.Group(visible=True) as aurora_box:
                            aurora_rank = gr.Slider(1, 128, value=aurora.rank, step=1, label="Aurora rank R")
                            aurora_parts = gr.CheckboxGroup(
                                [("gated query transformation", "gqt"), ("context enhancement", "ice"),
                                 ("tune task heads", "heads")], value=[],
                                label="Aurora extras (authors' recipe: all three)")
                        with gr.Group(visible=False) as lora_box:
                            lora_rank = gr.Slider(1, 64, value=lora.rank, step=1, label="LoRA r")
                        with gr.Group(visible=False) as vlpet_box:
                            granularity = gr.Radio(list(GRANULARITIES), value=vlpet.granularity,
                                                   label="VL-PET gate granularity")
                        with gr.Group(visible=False) as reduction_box:
                            reduction = gr.Slider(1, 64, value=adapter.reduction, step=1,
                                                  label="Bottleneck reduction (width / r)")
                        with gr.Group(visible=False) as prompt_box:
                            prompt_length = gr.Slider(1, 32, value=prompt.length, step=1, label="Prompt length")
                    with gr.Column(scale=1):
                        shots = gr.Number(16, precision=0, minimum=0, label="Shots (training items; 0 = all)")
                        epochs = gr.Slider(1, 50, value=10, step=1, label="Epochs")
                        lr = gr.Number(h.suggest_lr("offline", "aurora"), minimum=0,
                                       label="Learning rate (set from the method and backbone; yours to change)")
                        batch_size = gr.Slider(2, 128, value=16, step=1, label="Batch size")
                        frames = gr.Slider(1, 16, value=DEFAULT_FRAMES, step=1, label="Frames per video")
                        answers = gr.Textbox(label="VQA: extra candidate answers, comma-separated")
                        bf16 = gr.Checkbox(False, label="bf16 autocast", interactive=bf16_supported(pick_device()),
                                           info="on CPUs with avx512_bf16/AMX and on GPUs")
                        with gr.Row():
                            start = gr.Button("Start tuning", variant="primary")
                            cancel = gr.Button("Cancel", variant="stop")
                        status = gr.Markdown(elem_classes="petstudio-status")
                with gr.Row():
                    card = gr.Markdown()
                    loss_plot = gr.Plot(label="Loss")
                weights_out = gr.File(label="Tuned PET weights (pet.safetensors + run.json)", file_count="multiple",
                                      interactive=False)
                timer = gr.Timer(1.0, active=False)

            with gr.Tab("Ask", id="ask"):
                with gr.Row():
                    ask_run = gr.Dropdown([h.NO_RUN], value=h.NO_RUN,
                                          label="Tuned run to compare with its frozen model "
                                                "(none: the Tune tab's backbone alone)")
                with gr.Tab("Text → media"):
                    with gr.Row():
                        text_query = gr.Textbox(label="Describe what to find", scale=4)
                        search_text = gr.Button("Search", variant="primary", scale=1)
                    with gr.Row():
                        frozen_hits = gr.Gallery(label="frozen model: best matches", columns=5, height=280,
                                                 elem_id="frozen-hits")
                        tuned_hits = gr.Gallery(label="tuned model (the chosen run): best matches", columns=5,
                                                height=280,
                                                elem_id="tuned-hits")
                with gr.Tab("Media → text, and questions"):
                    with gr.Row():
                        with gr.Column():
                            ask_pick = gr.Dropdown([], label="A picture or clip of the dataset")
                            ask_upload = gr.File(label="…or upload one", file_types=MEDIA_TYPES)
                        with gr.Column():
                            search_media = gr.Button("Find its captions", variant="primary")
                            question = gr.Textbox(label="Question")
                            ask_answers = gr.Textbox(
                                label="Candidate answers, comma-separated (the dataset's are added)")
                            answer = gr.Button("Answer", variant="primary")
                    with gr.Row():
                        frozen_captions = gr.Dataframe(headers=CAPTION_COLUMNS,
                                                       label="frozen: best captions", interactive=False)
                        tuned_captions = gr.Dataframe(headers=CAPTION_COLUMNS,
                                                      label="tuned: best captions", interactive=False)
                    with gr.Row():
                        frozen_answers = gr.Label(label="frozen: top answers", num_top_classes=5)
                        tuned_answers = gr.Label(label="tuned: top answers", num_top_classes=5)
                    generated = gr.Markdown()
                with gr.Accordion("Tuned weights: download, or load saved ones", open=False):
                    with gr.Row():
                        download = gr.Button("Download the chosen run's weights")
                        downloaded = gr.File(label="Weights", file_count="multiple", interactive=False)
                    with gr.Row():
                        weights_in = gr.File(label="pet.safetensors and run.json", file_count="multiple",
                                             file_types=[".safetensors", ".json"])
                        load_weights = gr.Button("Load weights")
                    loaded = gr.Markdown()

            with gr.Tab("Inspect", id="inspect"):
                with gr.Row():
                    inspect_run = gr.Dropdown([h.NO_RUN], value=h.NO_RUN, label="Run")
                    inspect_pick = gr.Dropdown([], label="Picture for the gates (its first caption is the text)")
                    inspect = gr.Button("Inspect", variant="primary")
                budget_plot = gr.Plot(label="Parameter budget")
                gates_plot = gr.Plot(label="Gates")
                overlay_plot = gr.Plot(label="Gates over the picture")
                curves_plot = gr.Plot(label="Loss and metrics per epoch")

            with gr.Tab("Compare", id="compare"):
                refresh = gr.Button("Refresh")
                table = gr.Dataframe(headers=views.COMPARE_COLUMNS, label="This session's runs", interactive=False,
                                     elem_id="runs-table")
                compare_plot = gr.Plot(label="Metric against trainable parameters")

        dataset_outputs = [preview, stats, report, ask_pick, inspect_pick]
        load_sample.click(h.load_sample, [sample], dataset_outputs, api_name="load_sample")
        load_upload.click(h.upload_data, [upload], dataset_outputs, api_name="upload_data")

        model.change(h.model_notice, [model], [model_note], api_name="model_notice", queue=False)
        model.change(h.suggest_lr, [model, method], [lr], api_name="suggest_lr_for_model", queue=False)
        method.change(h.suggest_lr, [model, method], [lr], api_name="suggest_lr_for_method", queue=False)
        method.change(h.show_method_options, [method], [aurora_box, lora_box, vlpet_box, reduction_box, prompt_box],
                      api_name="method_options", queue=False)
        tune_inputs = [model, task, method, aurora_rank, aurora_parts, lora_rank, granularity, reduction,
                       prompt_length, shots, epochs, lr, batch_size, bf16, answers, frames]
        (start.click(h.start_tuning, None, [timer], api_name="start_live", queue=False)
         .then(h.tune_model, tune_inputs, [card, loss_plot, weights_out, ask_run, inspect_run, status],
               api_name="tune",
               concurrency_limit=TUNING_CONCURRENCY, concurrency_id="tuning")
         .then(h.stop_live, None, [timer], api_name="stop_live", queue=False)
         .then(h.compare_runs, None, [table, compare_plot], api_name="compare_after_tune"))
        cancel.click(h.cancel_tuning, None, [status], api_name="cancel", queue=False)
        timer.tick(h.live_progress, None, [loss_plot, status], api_name="live_progress", concurrency_limit=None,
                   show_progress="hidden")

        ask_models = [ask_run, model]
        search_text.click(h.search_text, [text_query, *ask_models], [frozen_hits, tuned_hits], api_name="search_text",
                          concurrency_id="inference", concurrency_limit=2)
        text_query.submit(h.search_text, [text_query, *ask_models], [frozen_hits, tuned_hits],
                          api_name="search_text_submit", concurrency_id="inference")
        search_media.click(h.search_media, [ask_upload, ask_pick, *ask_models], [frozen_captions, tuned_captions],
                           api_name="search_media", concurrency_id="inference")
        answer.click(h.answer_question, [ask_upload, ask_pick, question, ask_answers, *ask_models],
                     [frozen_answers, tuned_answers, generated], api_name="answer", concurrency_id="inference")
        download.click(h.download_weights, [ask_run], [downloaded], api_name="download_weights")
        load_weights.click(h.load_weights, [weights_in], [loaded, ask_run, inspect_run], api_name="load_weights",
                           concurrency_id="inference").then(h.compare_runs, None, [table, compare_plot],
                                                            api_name="compare_after_load")
        inspect.click(h.inspect_run, [inspect_run, inspect_pick], [budget_plot, gates_plot, overlay_plot, curves_plot],
                      api_name="inspect", concurrency_id="inference")
        refresh.click(h.compare_runs, None, [table, compare_plot], api_name="compare")

        def release(request: gr.Request) -> None:
            """The page closed: its session goes, and so does Gradio's copy of its page (every
            component's config), which Gradio would otherwise keep for thousands of sessions."""
            h.release(request)
            demo.state_holder.session_data.pop(request.session_hash, None)

        demo.unload(release)
    return demo


def launch_options() -> dict:
    """Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which Gradio reads itself."""
    return dict(theme=gr.themes.Soft(), css=CSS, max_file_size=MAX_UPLOAD, allowed_paths=[str(SAMPLES_ROOT)])


def serve() -> None:
    build_demo().queue(max_size=QUEUE_SIZE).launch(**launch_options())
