"""Placeholder replaced within minutes by the lead (check_grad and `softmax-jax check`)."""


def add_arguments(parser):
    pass


def run_cli(args):
    raise SystemExit("not yet")
