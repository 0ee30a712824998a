"""Mixed-precision search: MetaQuantNet (one network generating quantized weights for any per-layer policy) and a
genetic search over policies under a size / BOPs budget."""

from metaaug.search.genetic import GAConfig, genetic_search
from metaaug.search.job import SearchConfig, run_search
from metaaug.search.metaquant import MetaQuantConfig, MetaQuantNet
from metaaug.search.space import Budget, SearchSpace

__all__ = ["Budget", "GAConfig", "MetaQuantConfig", "MetaQuantNet", "SearchConfig", "SearchSpace", "genetic_search",
           "run_search"]
