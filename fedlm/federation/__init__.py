from fedlm.federation.checks import CollapsedClientsError
from fedlm.federation.config import FederationConfig, sample_clients
from fedlm.federation.loop import FederatedLoop
from fedlm.federation.privacy import DPConfig
from fedlm.federation.secure import SecureAggregationConfig, SecureAggregator
from fedlm.federation.server import ServerConfig, ServerOptimizer
from fedlm.federation.strategy import ClientStrategy
from fedlm.federation.topology import Topology, TopologyError

__all__ = [
    "ClientStrategy",
    "CollapsedClientsError",
    "FederatedLoop",
    "DPConfig",
    "FederationConfig",
    "SecureAggregationConfig",
    "SecureAggregator",
    "ServerConfig",
    "ServerOptimizer",
    "Topology",
    "TopologyError",
    "sample_clients",
]
