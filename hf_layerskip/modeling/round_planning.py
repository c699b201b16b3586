"""Lookup rounds in a batch only where the call has measured that they pay.

A lookup round verifies, in every row, its pending token and as many positions as its longest looked-up continuation.
For one row that costs about one step, but a batch can be compute-bound: on a 2-core CPU, 8 rows verifying 5 positions
each cost 1.3-2 one-position steps, while a looked-up token after a one-token match is accepted about a third of the
time. So a batch's round looks up, and verifies how many looked-up tokens, only where its expected tokens per
second beat what the call has measured for its other rounds (early-exit drafts, or none) with the same number of rows.

- Expected tokens: each row keeps one token, plus the looked-up tokens it accepts. A looked-up token following an
  `n`-token match is accepted with probability `p_n` once the ones before it were, `p_n` counted in the call (with one
  accepted and one rejected token as the prior), so a continuation of `l` tokens adds `p_n + p_n^2 + ... + p_n^l`.
- Seconds: moving averages of the call's measured rounds, per number of rows, and per verified width for lookups.
  Until the full lookup has been measured with this many rows, the round looks up in full; then a round of the other
  kind runs once; a shorter lookup not measured yet is costed on a straight line between the two.

This file travels with saved checkpoints as remote code: it imports only the standard library.
"""


class LookupPlanner:
    """Chooses, round by round, how many looked-up tokens a batch's round verifies (none: the other kind of round),
    from the call's measurements.

    Args:
        smoothing: weight of the newest round in the moving averages of seconds and tokens.
    """

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.reached: dict[int, int] = {}  # per match length n: looked-up tokens verified after all before them held
        self.accepted: dict[int, int] = {}  # ... and accepted
        self.lookup_seconds: dict[tuple[int, int], float] = {}  # (rows, verified width) -> seconds per round
        self.other_rounds: dict[int, tuple[float, float]] = {}  # rows -> (tokens, seconds) per round

    def acceptance(self, match_length: int) -> float:
        """The measured chance `p_n` that a looked-up token after a `match_length`-token match is accepted."""
        return (self.accepted.get(match_length, 0) + 1) / (self.reached.get(match_length, 0) + 2)

    def expected_tokens(self, matches: list[tuple[int, int]], limit: int | None = None) -> float:
        """Tokens a lookup round is expected to keep, summed over the rows; `matches` holds each active row's
        `(match length, continuation length)`, `(0, 0)` for a row without a match; `limit` cuts the continuations."""
        total = 0.0
        for match_length, length in matches:
            p = self.acceptance(match_length)
            total += 1 + sum(p**j for j in range(1, min(length, limit or length) + 1))
        return total

    def lookup_width(self, matches: list[tuple[int, int]]) -> int:
        """How many positions per row the round verifies: `1 + ` the looked-up tokens it drafts, at most the longest
        continuation; 1 declines the lookup for the other kind of round. The width with the most expected tokens per
        second wins; a width not measured yet with this many rows costs what a straight line between the other
        kind's round and the longest measured lookup gives (the full width is measured first, then the other kind)."""
        rows, width = len(matches), 1 + max(length for _, length in matches)
        full = self.lookup_seconds.get((rows, width))
        if full is None:
            return width
        if rows not in self.other_rounds:
            return 1
        tokens, seconds = self.other_rounds[rows]
        best, best_rate = 1, tokens / seconds
        for candidate in range(2, width + 1):
            candidate_seconds = self.lookup_seconds.get((rows, candidate))
            if candidate_seconds is None:
                candidate_seconds = seconds + (full - seconds) * (candidate - 1) / (width - 1)
            rate = self.expected_tokens(matches, candidate - 1) / candidate_seconds
            if rate > best_rate:
                best, best_rate = candidate, rate
        return best

    def record_lookup_round(self, matches: list[tuple[int, int]], accepted: list[int], width: int, seconds: float):
        """A lookup round's outcome: per active row, `matches` as in `expected_tokens` and the drafts it `accepted`
        (the padding after a short continuation may be accepted too; it does not count)."""
        for (match_length, length), count in zip(matches, accepted):
            if length:
                self.reached[match_length] = self.reached.get(match_length, 0) + min(count + 1, length)
                self.accepted[match_length] = self.accepted.get(match_length, 0) + min(count, length)
        key = (len(matches), width)
        self.lookup_seconds[key] = self._averaged(self.lookup_seconds.get(key), seconds)

    def record_other_round(self, rows: int, tokens: int, seconds: float):
        """A round without lookup over `rows` rows kept `tokens` tokens in all."""
        previous = self.other_rounds.get(rows)
        self.other_rounds[rows] = (
            self._averaged(None if previous is None else previous[0], tokens),
            self._averaged(None if previous is None else previous[1], seconds),
        )

    def _averaged(self, average: float | None, value: float) -> float:
        return value if average is None else (1 - self.smoothing) * average + self.smoothing * value


__all__ = ["LookupPlanner"]
