"""The Ask tab embeds a gallery once per model state and dataset (app/models.py)."""
from app import models
from app.sessions import SessionStore
from core.data import read_dataset
from core.data.samples import sample_path


def test_gallery_embeddings_are_computed_once_per_model_and_dataset(tmp_path):
    store = SessionStore(tmp_path)
    session = store.get("cache")
    session.dataset = read_dataset(sample_path("photos"), tmp_path)
    frozen = models.frozen(session, "offline", 0, False)
    first = models.gallery(session, frozen, 8)
    assert models.gallery(session, frozen, 8) is first
    assert models.frozen(session, "offline", 0, False) == frozen and len(session.models) == 1
    other = store.get("another")    # another session shares the frozen backbone, not the gallery
    assert models.frozen(other, "offline", 0, False) == frozen and other.models[frozen][0] is session.models[frozen][0]
    other_seed = models.frozen(session, "offline", 1, False)   # another model state, its own embeddings
    assert models.gallery(session, other_seed, 8) is not first
    session.dataset = read_dataset(sample_path("clips"), tmp_path)
    videos, embeddings = models.gallery(session, frozen, 4)   # clips read at a run's 4 frames
    assert videos.pixels.shape[:2] == (6, 4) and embeddings.media.shape[0] == 6
