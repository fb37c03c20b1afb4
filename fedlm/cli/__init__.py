from fedlm.cli.main import FedLMCLI, cli, main

__all__ = ["FedLMCLI", "cli", "main"]
