"""`dpeft.train.run(cfg)`: the one training loop behind `dpeft train`, torchrun and Ray."""

from dpeft.train.run import RunResult, run

__all__ = ["RunResult", "run"]
