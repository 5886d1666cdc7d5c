"""TorchServe handler for the 8x8 digits example (modelled on TorchServe's MNIST one)."""

from PIL import Image
from torchvision import transforms

from ts.torch_handler.image_classifier import ImageClassifier


def _to_8x8_gray(image: Image.Image) -> Image.Image:
    # BOX averages each block, which undoes the sample PNGs' 4x nearest-neighbour
    # upscale exactly and is a fair area average for any other image size.
    return image.convert("L").resize((8, 8), Image.BOX)


class DigitsClassifier(ImageClassifier):
    """Takes an image of a digit and returns the top-k digits with probabilities.

    Only image_processing is overridden: the model was trained on pixels in
    [0, 1] without normalisation, which is exactly what ToTensor produces.
    preprocess (PIL decode), inference and postprocess (softmax, top-k mapped
    through index_to_name.json) are inherited from ImageClassifier.
    """

    image_processing = transforms.Compose([
        transforms.Lambda(_to_8x8_gray),
        transforms.ToTensor(),
    ])
