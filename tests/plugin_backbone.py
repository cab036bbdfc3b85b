"""A user plug-in backbone (the README's CONCH recipe, wrapping open_clip's tiny model instead of `conch`)."""

from __future__ import annotations

from microbench.models.backbones import Backbone, build_backbone


class PluginBackbone(Backbone):
    kind = "plugin"

    def __init__(self, width_note: str = "tiny"):
        inner = build_backbone("open_clip", "microbench-tiny", pretrained=None)
        super().__init__(f"plugin-{width_note}", inner.preprocess, source={"library": "plugin"})
        self.inner = inner

    @property
    def embed_dim(self) -> int:
        return self.inner.embed_dim

    def encode_image(self, x):
        return self.inner.encode_image(x)

    def encode_text(self, tokens):
        return self.inner.encode_text(tokens)

    def tokenize(self, texts):
        return self.inner.tokenize(texts)
