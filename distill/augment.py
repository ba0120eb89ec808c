"""Teacher-labelled transfer set: word-level variants of the training sentences (Tang et al., 2019, section 3.1).

No extra models: a word is masked with the tokenizer's mask token, or replaced by a word seen between the same
two neighbours somewhere in the training texts (a cheap stand-in for the paper's same-part-of-speech swap; a
random frequent word when no other word shares that context), and with ``p_ngram`` the variant is cut down to a
random n-gram. The variants carry no gold label; the teacher labels them (``distill.transfer``).

    from distill.augment import Augmenter
    variants, _, sources = Augmenter(texts, AugmentSpec(copies=5), mask_token="[MASK]").transfer_set(texts)
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, defaultdict

import numpy as np

from search_space import AugmentSpec

FREQUENT_WORDS = 2000  # the fallback pool for replacement: common enough to be well trained in any student
_RETRIES = 10  # draws per variant before an unchanged copy of the sentence is accepted
_START, _END = "\x02", "\x03"  # sentence boundaries as neighbours; cannot occur in a whitespace-split word


class Augmenter:
    """Deterministic for a given (texts, spec): the same transfer set on every worker and host."""

    def __init__(self, texts: list[str], spec: AugmentSpec, mask_token: str | None) -> None:
        if spec.p_mask > 0 and not mask_token:
            raise ValueError("augment.p_mask > 0 needs a tokenizer with a mask token; set augment.p_mask to 0")
        self.spec = spec
        self.mask_token = mask_token
        counts: Counter[str] = Counter()
        by_context: dict[tuple[str, str], set[str]] = defaultdict(set)
        for text in texts:
            words = text.split()
            counts.update(words)
            padded = [_START, *words, _END]
            for i in range(1, len(padded) - 1):
                by_context[(padded[i - 1], padded[i + 1])].add(padded[i])
        # Sorted, so the choice of a replacement depends only on the seed, not on set iteration order.
        self.by_context = {ctx: sorted(words) for ctx, words in by_context.items() if len(words) > 1}
        self.frequent = [w for w, _ in counts.most_common(FREQUENT_WORDS)]

    def _replacement(self, rng: np.random.Generator, left: str, word: str, right: str) -> str:
        candidates = self.by_context.get((left, right))
        if not candidates:
            return self.frequent[int(rng.integers(len(self.frequent)))] if self.frequent else word
        pos = bisect_left(candidates, word)
        if pos < len(candidates) and candidates[pos] == word:  # draw among the others: skip the word itself
            pick = int(rng.integers(len(candidates) - 1))
            return candidates[pick + (pick >= pos)]
        return candidates[int(rng.integers(len(candidates)))]

    def variant(self, words: list[str], rng: np.random.Generator) -> list[str]:
        spec = self.spec
        out: list[str] = []
        padded = [_START, *words, _END]
        for i, word in enumerate(words, start=1):
            draw = rng.random()
            if draw < spec.p_mask:
                out.append(self.mask_token or word)
            elif draw < spec.p_mask + spec.p_replace:
                out.append(self._replacement(rng, padded[i - 1], word, padded[i + 1]))
            else:
                out.append(word)
        if len(out) > 1 and rng.random() < spec.p_ngram:
            n = min(int(rng.integers(1, spec.max_ngram + 1)), len(out))
            start = int(rng.integers(len(out) - n + 1))
            out = out[start : start + n]
        return out

    def _fresh_variant(self, words: list[str], rng: np.random.Generator) -> list[str]:
        for _ in range(_RETRIES):  # a variant identical to its sentence teaches nothing new
            new = self.variant(words, rng)
            if new != words:
                return new
        return new

    def side_variant(self, words: list[str], second: list[str] | None,
                     rng: np.random.Generator) -> tuple[list[str], list[str] | None]:
        """One variant of a row: a sentence, or a pair augmented side by side, each side on its own and redrawn
        while both sides come out unchanged."""
        if second is None:
            return self._fresh_variant(words, rng), None
        for _ in range(_RETRIES):
            new, new_second = self.variant(words, rng), self.variant(second, rng)
            if new != words or new_second != second:
                break
        return new, new_second

    def transfer_set(self, texts: list[str],
                     pairs: list[str] | None = None) -> tuple[list[str], list[str] | None, np.ndarray]:
        """``copies`` variants per row: (variant texts, variant pair texts or None, the row each came from).

        In rounds (``round_rng``): one variant of every row, then the next, so that the first k rounds are the
        k-copy set whatever ``copies`` is. A row whose first text has no words gets none.
        """
        variants: list[str] = []
        variant_pairs: list[str] | None = None if pairs is None else []
        sources: list[int] = []
        for round_no in range(self.spec.copies):
            rng = round_rng(self.spec.seed, round_no)
            for row, text in enumerate(texts):
                words = text.split()
                if not words:
                    continue
                new, new_second = self.side_variant(words, None if pairs is None else pairs[row].split(), rng)
                variants.append(" ".join(new))
                if variant_pairs is not None and new_second is not None:
                    variant_pairs.append(" ".join(new_second))
                sources.append(row)
        return variants, variant_pairs, np.asarray(sources, dtype=np.int64)


def round_rng(seed: int, round_no: int) -> np.random.Generator:
    """The random stream of one round of a transfer set: the same whatever the number of rounds, on every host."""
    return np.random.default_rng([seed, round_no])
