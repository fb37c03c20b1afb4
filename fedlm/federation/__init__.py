from fedlm.federation.loop import CollapsedClientsError, FederatedLoop, FederationConfig, sample_clients
from fedlm.federation.secure import SecureAggregationConfig, SecureAggregator
from fedlm.federation.server import ServerConfig, ServerOptimizer
from fedlm.federation.strategy import ClientStrategy
from fedlm.federation.topology import Topology, TopologyError

__all__ = [
    "ClientStrategy",
    "CollapsedClientsError",
    "FederatedLoop",
    "FederationConfig",
    "SecureAggregationConfig",
    "SecureAggregator",
    "ServerConfig",
    "ServerOptimizer",
    "Topology",
    "TopologyError",
    "sample_clients",
]
