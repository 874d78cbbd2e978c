"""PET Studio: `python app.py` serves the app (locally, on a Hugging Face Space, in a classroom).
Host and port come from GRADIO_SERVER_NAME and GRADIO_SERVER_PORT."""
from app.ui import serve

if __name__ == "__main__":
    serve()
