"""A plugin that takes a name raycv already has: loading it must fail in one line naming both."""

from raycv.models import register_model


@register_model("simple_cnn")
def my_simple_cnn(*, num_classes, weights=None):
    raise AssertionError("never built")
