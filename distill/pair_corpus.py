"""The transfer set's rows: per-side variants, and for sentence pairs, pairs that teach the relation (issue 25).

For each round (one row per train row, ``distill.augment.round_rng``) and train pair, one strategy
(``search_space.PairAugmentSpec``):

- ``side``: the pair augmented side by side (``distill.augment.Augmenter``), what single texts always get;
- ``hard_negative``: the pair's first sentence with a lexically close sentence of the corpus that is not its
  partner: one of its ``hard_negative_pool`` nearest by TF-IDF cosine among every distinct sentence of both sides
  (``LexicalNeighbours``); a sentence that shares no word with any other gets a random partner instead;
- ``random_pair``: the first sentence with a random sentence of the corpus, not its partner;
- ``perturbed``: both sides perturbed (a word replaced by one of its nearest whole words in the teacher's
  input-embedding space, ``WordNeighbours``; deleted; swapped with another word of its sentence), then with
  ``p_order`` the two sentences swapped.

Deterministic for (texts, spec, teacher) on every host: each round has its own random stream, neighbours are ranked
on rounded scores with ties broken by id. The rows carry no gold label: the teacher labels them (``distill.transfer``).

    corpus = build_corpus(firsts, seconds, AugmentSpec(copies=2, pairs={"hard_negatives": 0.5}), tokenizer)
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from distill.augment import _RETRIES, Augmenter, round_rng
from search_space import AugmentSpec, PairAugmentSpec

# A row's strategy is its index here; a row's draw picks one in this order, per-side augmentation taking the rest.
STRATEGIES = ("hard_negative", "random_pair", "perturbed", "side")
HARD_NEGATIVE, RANDOM_PAIR, PERTURBED, SIDE = range(len(STRATEGIES))
_DECIMALS = 9  # scores are ranked rounded to this many decimals: the same order on every host
_CHUNK = 512  # anchors (or query words) scored at a time: bounds the dense score block's memory


@dataclasses.dataclass
class Corpus:
    """The transfer set's texts in rounds: ``round_ends[k - 1]`` rows are the k-copy set."""

    texts: list[str]
    pairs: list[str] | None
    sources: np.ndarray  # [rows] int64: the train row each came from (a recombined pair's: its anchor's)
    strategies: np.ndarray  # [rows] int64: index into STRATEGIES
    round_ends: list[int]
    seconds: dict[str, float]  # what each stage took

    def strategy_rows(self) -> dict[str, int]:
        return strategy_rows(self.strategies)


def strategy_rows(strategies: np.ndarray) -> dict[str, int]:
    """Rows per strategy name."""
    counts = np.bincount(strategies, minlength=len(STRATEGIES))
    return {name: int(n) for name, n in zip(STRATEGIES, counts, strict=True)}


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the (at most) ``k`` best positive ``scores``, best first, ties by index: whatever the sort."""
    candidates = np.flatnonzero(scores > 0)
    if len(candidates) > k:
        kth = np.partition(scores[candidates], len(candidates) - k)[len(candidates) - k]  # the k-th largest value
        candidates = candidates[scores[candidates] >= kth]
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


def tfidf_rows(sentences: list[str]) -> Any:
    """The sentences' TF-IDF rows (sparse CSR, L2-normalised: a dot product is the cosine), words of any length:
    the one lexical similarity of the pair corpus's hard negatives and pre-distillation's related partners."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b", sublinear_tf=True, dtype=np.float64)
    return vectorizer.fit_transform(sentences).tocsr()


class LexicalNeighbours:
    """Each first sentence's nearest other sentences of the corpus by TF-IDF cosine, never its own partners (any
    sentence it is paired with, either way round) nor itself."""

    def __init__(self, firsts: list[str], seconds: list[str], pool: int) -> None:
        self.sentences = sorted(set(firsts) | set(seconds))
        index = {s: i for i, s in enumerate(self.sentences)}
        self.anchor_of_row = np.asarray([index[s] for s in firsts], dtype=np.int64)
        self.partners: dict[int, set[int]] = defaultdict(set)
        for a, b in zip(firsts, seconds, strict=True):
            self.partners[index[a]].add(index[b])
            self.partners[index[b]].add(index[a])
        self.pool = pool
        self._nearest: dict[int, np.ndarray] | None = None

    def nearest(self, anchor: int) -> np.ndarray:
        """Sentence ids of ``anchor``'s hard negatives, nearest first (computed for every anchor on first use)."""
        return self.compute()[anchor]

    def compute(self) -> dict[int, np.ndarray]:
        """Every anchor's hard negatives (once)."""
        if self._nearest is not None:
            return self._nearest
        matrix = tfidf_rows(self.sentences)
        transposed = matrix.T.tocsc()
        anchors = np.unique(self.anchor_of_row)
        nearest: dict[int, np.ndarray] = {}
        for start in range(0, len(anchors), _CHUNK):
            block = anchors[start:start + _CHUNK]
            scores = np.round((matrix[block] @ transposed).toarray(), _DECIMALS)
            for row, anchor in enumerate(block):
                excluded = [int(anchor), *self.partners[int(anchor)]]
                scores[row, excluded] = 0.0
                nearest[int(anchor)] = _top(scores[row], self.pool)
        self._nearest = nearest
        return nearest

    def random_partner(self, anchor: int, rng: np.random.Generator) -> int:
        """A random sentence of the corpus other than ``anchor`` and its partners (when the corpus has one)."""
        excluded = self.partners[anchor] | {anchor}
        pick = int(rng.integers(len(self.sentences)))
        for _ in range(_RETRIES):
            if pick not in excluded:
                break
            pick = int(rng.integers(len(self.sentences)))
        return pick


def whole_words(tokenizer: Any, rows: int) -> dict[int, str]:
    """The tokenizer's whole-word vocabulary: id → word, for tokens that are alphabetic words on their own (no
    subword piece, no special or unused token) and that the tokenizer encodes back to that one id."""
    special = set(tokenizer.all_special_ids)
    tokens = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i < rows and i not in special)
    named = [(i, tokenizer.convert_tokens_to_string([t]).strip()) for i, t in tokens]
    named = [(i, word) for i, word in named if word.isalpha()]
    encoded = tokenizer([word for _, word in named], add_special_tokens=False)["input_ids"] if named else []
    return {i: word for (i, word), ids in zip(named, encoded, strict=True) if list(ids) == [i]}


class WordNeighbours:
    """Each corpus word's ``k`` nearest whole words in the teacher's input-embedding space (cosine), itself excluded.

    Only words the tokenizer encodes as one whole-word token get neighbours; the others are never replaced. Scored in
    float32, then the best ``k + 8`` re-scored in float64 and ranked on rounded scores, ties by id: the same
    neighbours on every host.
    """

    def __init__(self, words: Iterable[str], embeddings: torch.Tensor, tokenizer: Any, k: int) -> None:
        weights = embeddings.detach().to("cpu", torch.float64).numpy()
        unit64 = weights / np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-12)
        unit32 = unit64.astype(np.float32)
        vocab = whole_words(tokenizer, weights.shape[0])
        candidates = np.asarray(sorted(vocab), dtype=np.int64)
        position = {int(i): p for p, i in enumerate(candidates)}
        unique = sorted(set(words))
        encoded = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        word_ids = {w: int(ids[0]) for w, ids in zip(unique, encoded, strict=True)
                    if len(ids) == 1 and int(ids[0]) in position}
        queries = np.asarray(sorted(set(word_ids.values())), dtype=np.int64)
        shortlist = min(k + 8, len(candidates) - 1)
        by_id: dict[int, list[str]] = {}
        if shortlist > 0:
            table = unit32[candidates]
            for start in range(0, len(queries), _CHUNK):
                block = queries[start:start + _CHUNK]
                sims = unit32[block] @ table.T
                sims[np.arange(len(block)), [position[int(q)] for q in block]] = -np.inf  # never itself
                short = np.argpartition(-sims, shortlist - 1, axis=1)[:, :shortlist]
                for row, query in enumerate(block):
                    ids = candidates[short[row]]
                    ids = ids[ids != query]
                    exact = np.round(unit64[ids] @ unit64[query], _DECIMALS)
                    order = np.lexsort((ids, -exact))[:k]
                    by_id[int(query)] = [vocab[int(i)] for i in ids[order]]
        self.table = {w: by_id[i] for w, i in word_ids.items() if by_id.get(i)}

    def get(self, word: str) -> list[str]:
        return self.table.get(word, [])


class PairPerturber:
    """Perturbed copies of a pair (``PairAugmentSpec``'s ``p_neighbour``, ``p_delete``, ``p_swap``, ``p_order``)."""

    def __init__(self, spec: PairAugmentSpec, neighbours: WordNeighbours | None) -> None:
        self.spec = spec
        self.neighbours = neighbours

    def words(self, words: list[str], rng: np.random.Generator) -> list[str]:
        if not words:
            return []
        spec = self.spec
        out: list[str] = []
        for word in words:
            draw = rng.random()
            if draw < spec.p_neighbour:
                options = self.neighbours.get(word) if self.neighbours is not None else []
                out.append(options[int(rng.integers(len(options)))] if options else word)
            elif draw >= spec.p_neighbour + spec.p_delete:
                out.append(word)
        if not out:  # everything deleted: keep one word
            out = [words[int(rng.integers(len(words)))]]
        if len(out) > 1:
            for i in range(len(out)):
                if rng.random() < spec.p_swap:  # swapped with another word of the sentence
                    j = int(rng.integers(len(out) - 1))
                    j += j >= i
                    out[i], out[j] = out[j], out[i]
        return out

    def pair(self, first: list[str], second: list[str],
             rng: np.random.Generator) -> tuple[list[str], list[str]]:
        for _ in range(_RETRIES):  # a copy identical to its pair teaches nothing new
            a, b = self.words(first, rng), self.words(second, rng)
            if rng.random() < self.spec.p_order:
                a, b = b, a
            if (a, b) != (first, second):
                break
        return a, b


def _words_of(texts: Iterable[str]) -> set[str]:
    return {word for text in texts for word in text.split()}


def build_corpus(texts: list[str], pairs: list[str] | None, spec: AugmentSpec, tokenizer: Any,
                 embeddings: torch.Tensor | None = None) -> Corpus:
    """``spec.copies`` rounds of one row per train row (a row whose first text has no words gets none).

    ``embeddings`` (the teacher's input embeddings, ``model.get_input_embeddings().weight``) are needed only by
    perturbed pairs with ``p_neighbour`` above 0. Raises ValueError for what the spec asks that the data or the
    tokenizer cannot give (masking without a mask token, pair strategies without pairs).
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    augmenter = Augmenter([*texts, *(pairs or [])], spec, tokenizer.mask_token)
    mix = spec.pairs
    if not mix.active:  # per-side augmentation alone: the Augmenter's rounds
        variants, variant_pairs, sources = augmenter.transfer_set(texts, pairs)
        per_round = len(variants) // spec.copies if spec.copies else 0
        seconds["generate"] = seconds["total"] = round(time.perf_counter() - started, 3)
        return Corpus(variants, variant_pairs, sources, np.full(len(variants), SIDE, dtype=np.int64),
                      [per_round * (r + 1) for r in range(spec.copies)], seconds)
    if pairs is None:
        raise ValueError("augment.pairs: hard negatives, random pairs and perturbed pairs need sentence pairs "
                         "(dataset.text_pair_column)")
    lexical = LexicalNeighbours(texts, pairs, mix.hard_negative_pool)
    if mix.hard_negatives:
        mark = time.perf_counter()
        lexical.compute()
        seconds["hard_negatives"] = round(time.perf_counter() - mark, 3)
    neighbours = None
    if mix.perturbed and mix.p_neighbour:
        if embeddings is None:
            raise ValueError("perturbed pairs with p_neighbour > 0 need the teacher's input embeddings")
        mark = time.perf_counter()
        neighbours = WordNeighbours(_words_of([*texts, *pairs]), embeddings, tokenizer, mix.neighbours)
        seconds["word_neighbours"] = round(time.perf_counter() - mark, 3)
    perturber = PairPerturber(mix, neighbours)
    bounds = np.cumsum([mix.hard_negatives, mix.random_pairs, mix.perturbed])
    mark = time.perf_counter()
    out_texts: list[str] = []
    out_pairs: list[str] = []
    out_sources: list[int] = []
    out_strategies: list[int] = []
    round_ends: list[int] = []
    split = [(text.split(), second.split()) for text, second in zip(texts, pairs, strict=True)]
    for round_no in range(spec.copies):
        rng = round_rng(spec.seed, round_no)
        for row, (first, second) in enumerate(split):
            if not first:
                continue
            strategy = int(np.searchsorted(bounds, rng.random(), side="right"))  # an index of STRATEGIES
            anchor = int(lexical.anchor_of_row[row])
            a, b = texts[row], pairs[row]
            if strategy == HARD_NEGATIVE:
                nearest = lexical.nearest(anchor)
                if len(nearest):
                    b = lexical.sentences[int(nearest[int(rng.integers(len(nearest)))])]
                else:  # no other sentence shares a word with it: a random partner
                    strategy = RANDOM_PAIR
            if strategy == RANDOM_PAIR:
                b = lexical.sentences[lexical.random_partner(anchor, rng)]
            elif strategy == PERTURBED:
                new_a, new_b = perturber.pair(first, second, rng)
                a, b = " ".join(new_a), " ".join(new_b)
            elif strategy == SIDE:
                new_a, side_b = augmenter.side_variant(first, second, rng)
                a, b = " ".join(new_a), " ".join(side_b or [])
            out_texts.append(a)
            out_pairs.append(b)
            out_sources.append(row)
            out_strategies.append(strategy)
        round_ends.append(len(out_texts))
    seconds["generate"] = round(time.perf_counter() - mark, 3)
    seconds["total"] = round(time.perf_counter() - started, 3)
    return Corpus(out_texts, out_pairs, np.asarray(out_sources, dtype=np.int64),
                  np.asarray(out_strategies, dtype=np.int64), round_ends, seconds)
