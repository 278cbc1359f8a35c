"""Training: the tf.data input pipeline and everything that turns a split into a shipped model.

- ``input_pipeline`` — decode, cache, resize and batch; ``augment`` — the training-split augmentations.
- ``preview`` — one plotted augmented batch.
- ``models`` — the architectures (SmallNet, cxrnet, resnet, VGG16) and their options.
- ``disk`` — room checks and torn checkpoints.
- ``train`` — the step: fit, health check, model card, ship or reject; ``health`` — the collapse check.
- ``ensemble`` — the probability-averaging ensemble of trained models.
"""
