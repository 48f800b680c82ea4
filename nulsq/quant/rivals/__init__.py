"""The rival quantizers of the paper's comparison tables; importing this package registers them.

kinds: pact, apot, lcq, ternary, dorefa, lqnets (see each module's docstring for its equations).
"""

from nulsq.quant.rivals import apot, dorefa, lcq, lqnets, pact  # noqa: F401  (registration)
