"""Training side of newstagger: data import, splits and (elsewhere) fine-tuning."""
