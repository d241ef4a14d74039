"""The card's runner programs as an engine.

- `engine.py`: `CardEngine`, the owner loop and its state;
- `planner.py`: how a request reaches the runner (continue, reset, restart, refuse), pure;
- `process.py`: the run script's process group, its pipes and their watchers;
- `output.py`: the runner's stdout bytes as events, pure;
- `dialects.py`: the runner generations (A, B, C) as one table;
- `config.py`: the descriptor fields of a card model.
"""
from .config import CardConfig
from .engine import CardEngine

__all__ = ["CardConfig", "CardEngine"]
