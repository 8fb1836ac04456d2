"""Test-only, for the ImageReward venv (on ``PYTHONPATH`` there): the package's BLIP builds
its ViT with ``create_vit('large', ...)`` (ViT-L/16: 24 blocks of width 1024, 300M
parameters, too slow for a CPU test), and no config reaches that size.  This hook swaps
``ImageReward.models.BLIP.blip_pretrain.create_vit`` for one that builds the package's own
``VisionTransformer`` with the same patch size and image size but 2 blocks of width 64, as
soon as that module is imported.  Everything else (BERT text encoder with cross-attention,
MLP, tokenizer, preprocessing, ``score()``) is the package's code, unchanged.
"""

import importlib.abc
import sys

TARGET = "ImageReward.models.BLIP.blip_pretrain"
WIDTH, DEPTH, HEADS = 64, 2, 4


def small_create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
    from ImageReward.models.BLIP.vit import VisionTransformer

    assert vit == "large", vit  # what ImageReward.ImageReward asks for
    return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                             use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                             drop_path_rate=drop_path_rate), WIDTH


class _SmallViT(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module.create_vit = small_create_vit

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _SmallViT())
