"""FedAvg (McMahan et al. 2017): example-weighted mean of the silo deltas."""

from fedsilo.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
