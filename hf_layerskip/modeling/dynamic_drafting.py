"""Dynamic drafting: each self-speculative round drafts from the exit that has paid best so far in the call.

In the spirit of DEL (arXiv 2504.05598), which picks the exit layer and draft length of LayerSkip models at decode
time. A round with a draft exit `e` costs about one full step (layers `0..e-1` for the last token, `e..L-1` in
verification) plus, per proposed draft, a pass through layers `0..e-1`: `e / L` of a step. It yields one token plus
the accepted drafts. So an exit's measured speed is `(rounds + accepted) / (rounds + drafted * e / L)` in tokens per
full-step cost; the draft length follows from the confidence threshold, which stops each draft. This file travels
with saved checkpoints as remote code: it imports only the standard library.
"""

import math


class ExitChooser:
    """Picks each round's draft exit among `exits` by an upper confidence bound on its measured speed.

    Args:
        exits: the candidate exit layers (those with an exit adapter). num_layers: the model's `L`.
        exploration: weight of the bound's width; every exit is tried once before any is preferred.
    """

    def __init__(self, exits: list[int], num_layers: int, exploration: float = 0.3):
        if not exits:
            raise ValueError("Dynamic drafting needs at least one candidate exit layer.")
        self.exits = sorted(exits)
        self.num_layers = num_layers
        self.exploration = exploration
        self.rounds = dict.fromkeys(self.exits, 0)  # rounds times the rows that took part
        self.drafted = dict.fromkeys(self.exits, 0)
        self.accepted = dict.fromkeys(self.exits, 0)

    def speed(self, exit_layer: int) -> float:
        """Tokens per full-step cost measured at `exit_layer` so far (1.0 before its first round)."""
        rounds = self.rounds[exit_layer]
        cost = rounds + self.drafted[exit_layer] * exit_layer / self.num_layers
        return (rounds + self.accepted[exit_layer]) / cost if rounds else 1.0

    def choose(self) -> int:
        untried = [exit_layer for exit_layer in self.exits if not self.rounds[exit_layer]]
        if untried:
            return untried[0]
        total = sum(self.rounds.values())

        def bound(exit_layer):
            return self.speed(exit_layer) + self.exploration * math.sqrt(math.log(total) / self.rounds[exit_layer])

        return max(self.exits, key=bound)

    def record(self, exit_layer: int, rows: int, drafted: int, accepted: int) -> None:
        """A round of `rows` rows drafted from `exit_layer`: `drafted` tokens proposed, `accepted` of them kept, both
        summed over the rows."""
        self.rounds[exit_layer] += rows
        self.drafted[exit_layer] += drafted
        self.accepted[exit_layer] += accepted


__all__ = ["ExitChooser"]
