"""PET Studio's tuning engine: backbones, PET methods, data, tasks, trainer, checkpoints, CLI.

Importable without gradio; `python -m core --help` lists the commands.
"""
