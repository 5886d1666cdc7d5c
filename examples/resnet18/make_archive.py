"""Build ``resnet18.mar``: torchvision's resnet18 with random (seeded) weights, built-in handler.

Writes, next to this script:

* ``index_to_name.json``  the 1000 ImageNet labels bundled with torchvision (no download)
* ``photo.jpg``           a sample photo: scikit-learn's bundled ``china.jpg`` when scikit-learn
                          is installed, else a synthesized colour test pattern

and ``resnet18.mar`` into ``--export-path`` (created if missing). The weights (~45 MB) go to a
temporary directory only; they are random, so the predicted labels mean nothing.

Usage (from any directory)::

    python examples/resnet18/make_archive.py [--export-path model-store] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTO_WIDTH = 500


def write_weights(path: Path, seed: int) -> None:
    import torch

    # The model file is archived on its own, not as part of a package; import it by path.
    sys.path.insert(0, str(HERE))
    try:
        from model import ResNet18
    finally:
        sys.path.remove(str(HERE))
    torch.manual_seed(seed)
    torch.save(ResNet18().state_dict(), path)


def write_labels(path: Path) -> None:
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    path.write_text(json.dumps({str(i): name for i, name in enumerate(categories)}, indent=1) + "\n")


def write_photo(path: Path) -> str:
    """Save the sample photo as JPEG (quality 90); returns where it came from."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        image = _test_pattern(PHOTO_WIDTH, PHOTO_WIDTH * 2 // 3)
        source = "a synthesized test pattern (scikit-learn is not installed)"
    else:
        image = Image.fromarray(load_sample_image("china.jpg"))
        height = round(image.height * PHOTO_WIDTH / image.width)
        image = image.resize((PHOTO_WIDTH, height), Image.Resampling.LANCZOS)
        source = "scikit-learn's sample image china.jpg"
    image.save(path, "JPEG", quality=90)
    return source


def _test_pattern(width: int, height: int):  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    red = Image.linear_gradient("L").rotate(90).resize((width, height))
    green = Image.linear_gradient("L").resize((width, height))
    blue = Image.radial_gradient("L").resize((width, height))
    image = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(image)
    colours = ["#ffffff", "#ffff00", "#00ffff", "#00ff00", "#ff00ff", "#ff0000", "#0000ff", "#000000"]
    bar = width // len(colours)
    for i, colour in enumerate(colours):
        draw.rectangle([i * bar, height * 3 // 4, (i + 1) * bar - 1, height - 1], fill=colour)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-path", default="model-store", help="where resnet18.mar goes (default: model-store)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--config-file", help="a model YAML to archive with it (model-archiver's --config-file)")
    args = parser.parse_args(argv)
    export = Path(args.export_path).resolve()
    export.mkdir(parents=True, exist_ok=True)

    labels = HERE / "index_to_name.json"
    write_labels(labels)
    source = write_photo(HERE / "photo.jpg")
    print(f"wrote {HERE / 'photo.jpg'} from {source}")

    # marserve's model-archiver, installed next to this interpreter.
    archiver = Path(sys.executable).parent / "model-archiver"
    with tempfile.TemporaryDirectory(prefix="resnet18-") as tmp:
        weights = Path(tmp) / "resnet18.pt"
        write_weights(weights, args.seed)
        subprocess.run(
            [
                str(archiver), "--model-name", "resnet18", "--version", "1.0",
                "--handler", "image_classifier",
                "--model-file", str(HERE / "model.py"),
                "--serialized-file", str(weights),
                "--extra-files", str(labels),
                "--export-path", str(export), "--force",
                *(["--config-file", str(Path(args.config_file).resolve())] if args.config_file else []),
            ],
            check=True,
        )  # fmt: skip
    print(f"wrote {export / 'resnet18.mar'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
