"""The models plugin's model resolvers (hook spec 1.2): names in the store, and ORG/NAME on the hub.

``store`` knows aliases, the names under models/ (ORG/NAME downloaded before among them), the
default model `influence models default` chose and the bundled one; ``hub`` downloads an ORG/NAME
the store does not have yet. They are asked in that order, after any third party's resolvers.
"""

from __future__ import annotations

from pathlib import Path

from influence_core.interfaces import ModelResolver, ModelSource

from . import catalog, hub, store


def resolve_in_store(reference: str | None, prefer_quantized: bool) -> Path | ModelSource | None:
    path = store.resolve_default_model() if reference is None else catalog.find_in_store(reference)
    if path is not None and store.is_bundled(path):
        return store.open_bundled(path, prefer_quantized)
    return path


def resolve_on_hub(reference: str | None, prefer_quantized: bool) -> Path | None:
    if reference is None or not hub.REPO_ID.fullmatch(reference):
        return None
    return store.loadable_path(hub.download(reference))


STORE = ModelResolver("store", resolve_in_store, names=catalog.model_names, default_name=catalog.default_name,
                      description="aliases and names in the store, see `influence models list`")
HUB = ModelResolver("hub", resolve_on_hub,
                    description="ORG/NAME on the Hugging Face hub, downloaded into the store on first use")
