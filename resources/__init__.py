"""Files shipped with the package: the sample H&E image and the default models."""
