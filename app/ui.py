"""The page: the tabs of app/tabs in order, each laid out and then wired, and how it is served.
Every event has an api_name, so everything the page does can also be done from gradio_client."""
from __future__ import annotations

import os
from types import SimpleNamespace

import gradio as gr

from app.sessions import release
from app.tabs import TABS
from core.data.samples import SAMPLES_ROOT

QUEUE_SIZE = int(os.environ.get("PETSTUDIO_QUEUE_SIZE", "32"))
MAX_UPLOAD = os.environ.get("PETSTUDIO_MAX_UPLOAD", "200mb")
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


class Page(SimpleNamespace):
    """Every tab's components by name, for events that cross tabs; a name is given once."""

    def __setattr__(self, name: str, value) -> None:
        if hasattr(self, name):
            raise ValueError(f"two tabs name a component '{name}'")
        super().__setattr__(name, value)


def build_demo() -> gr.Blocks:
    page = Page()
    with gr.Blocks(title="PET Studio", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            for tab in TABS:
                tab.layout(page)
        for tab in TABS:
            tab.wire(page)

        def close(request: gr.Request) -> None:
            """The page closed: its session goes, and so does Gradio's copy of its page (every
            component's config), which Gradio would otherwise keep for thousands of sessions."""
            release(request)
            demo.state_holder.session_data.pop(request.session_hash, None)

        demo.unload(close)
    return demo


def launch_options() -> dict:
    """Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which Gradio reads itself."""
    return dict(theme=gr.themes.Soft(), css=CSS, max_file_size=MAX_UPLOAD, allowed_paths=[str(SAMPLES_ROOT)])


def serve() -> None:
    build_demo().queue(max_size=QUEUE_SIZE).launch(**launch_options())
