"""What the serving tests share."""

import time
from contextlib import contextmanager


@contextmanager
def slow_decoder(model, delay_s: float):
    """Every decoder pass (prefill or step) of the model sleeps first: requests stay in flight."""
    inner = model.model.decode

    def slow(*args, **kwargs):
        time.sleep(delay_s)
        return inner(*args, **kwargs)

    model.model.decode = slow
    try:
        yield
    finally:
        del model.model.decode  # the instance attribute goes; the method is back
