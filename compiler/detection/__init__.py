"""The detection domain: model specs (input size, preprocessing, decoder), datasets, decoders,
NMS, COCO metrics and box agreement. Knows nothing of passes or targets."""
