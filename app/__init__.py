"""PET Studio's Gradio UI: layout, event handlers and per-session state; every computation is a call into core."""
