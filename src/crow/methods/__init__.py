"""The training methods: a method is a config dataclass (``TrainingConfig`` and its own fields) and a module whose
``run(model, tokenizer, records, config, run_options)`` trains with it. ``crow.defenses`` registers them by name."""

from __future__ import annotations


def purify(model, tokenizer, records, config=None, run_options=None):
    """Run the method of ``config`` (``UnlearnConfig``, the recommended recipe, or ``CrowConfig``, the default) on
    ``records``, the defender's clean samples: a ``PurifyResult`` whose ``model`` is the purified model."""
    from . import crow, unlearn

    config = config if config is not None else crow.CrowConfig()
    method = unlearn if isinstance(config, unlearn.UnlearnConfig) else crow
    return method.run(model, tokenizer, records, config, run_options)
