"""Networks: the from-scratch zoo (`zoo`) and the pretrained backbones (`backbones`), two
registries that import nothing from here, and `classifier`, which builds a `Classifier` (the
saved and served model) from either."""
