"""Example budgets for the property tests: full in the suite, a fifth in mutation runs.

``benchmarks/mutation.py`` sets ``KVSCHED_MUTATION=1``: it runs these tests once per mutant, where the
derandomized first fifth of the examples still finds what the direct example tests miss, at a
fifth of the cost.
"""

import os


def mutation_budget(max_examples: int) -> int:
    if os.environ.get("KVSCHED_MUTATION"):
        return max(10, max_examples // 5)
    return max_examples
