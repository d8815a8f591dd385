"""Small helpers shared by unit and integration tests."""

from __future__ import annotations

from pipelines.data.storage import get_fs


def put_placeholders(root_uri: str, options, relative_paths: list[str]) -> None:
    """Files with placeholder bytes at `relative_paths` under `root_uri` (importers only list)."""
    fs, base = get_fs(root_uri, options)
    for relative in relative_paths:
        path = f"{base}/{relative}"
        if fs.protocol[0] in ("file", "local"):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"placeholder")


def untrained_checkpoint(folder, num_classes: int) -> str:
    """A tiny seeded DeepLabv3+ / MobileNetV2 x0.25 checkpoint directory (segmentation tests)."""
    import torch

    from deeplab_core.models import build_model
    from pipelines.data.checkpoints import save_checkpoint_dir

    torch.manual_seed(0)
    model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=num_classes,
                        width_mult=0.25, output_stride=16)
    return str(save_checkpoint_dir(model, folder, {"note": "untrained"}))
