"""What the `evaluate` modules under `metrics/` share: their `MetricInfo`, and telling texts from other inputs."""

import datasets
import evaluate


def metric_info(description: str, inputs_description: str, *prediction_types) -> evaluate.MetricInfo:
    """A `MetricInfo` whose only input, `predictions`, may be any of `prediction_types` (`datasets` feature types;
    `evaluate` picks the first that fits the data)."""
    features = [datasets.Features({"predictions": kind}) for kind in prediction_types]
    return evaluate.MetricInfo(description=description, citation="", inputs_description=inputs_description,
                               features=features if len(features) > 1 else features[0])


def are_texts(predictions) -> bool:
    """True when `predictions` are strings (texts), False for token ids or feature vectors."""
    return len(predictions) > 0 and isinstance(predictions[0], str)
