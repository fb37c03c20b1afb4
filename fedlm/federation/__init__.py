from fedlm.federation.loop import CollapsedClientsError, FederatedLoop, FederationConfig
from fedlm.federation.strategy import ClientStrategy
from fedlm.federation.topology import Topology, TopologyError

__all__ = ["ClientStrategy", "CollapsedClientsError", "FederatedLoop", "FederationConfig", "Topology", "TopologyError"]
