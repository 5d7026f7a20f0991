"""Synthetic long-context retrieval tasks, generated offline from a seed.

Why: sparse top-p decode attention is only worth studying on prompts whose answer hides somewhere
in a long context, and the comparison with dense attention must be reproducible. Every sample here
is built from a local ``random.Random`` seeded by ``(task, length, seed, index)``, so the same
arguments always give the same prompts, independently of ``n`` and of any global RNG state.

Prompts are plain text completions (no chat template): the model continues the prompt and the
continuation should start with :attr:`Sample.answer`. Each prompt is sized with the caller's
tokenizer to be a little shorter than the requested ``length`` so that the prompt *plus* the
answer tokens (:func:`max_new_tokens`) fit inside ``length`` tokens.

Task kinds
----------
passkey
    One five-digit pass key hidden in filler text at a depth from 0 to 1.
multikey
    Several ``word -> number`` needles in filler text; the one at the sample's depth is asked.
multivalue
    One word with several numbers ("... for apple in the first list is 1234."), spread through
    filler text; the number of one list is asked (``MULTIVALUE_MODE = "all"`` asks for every
    number, which the bundled 135M model cannot do).
kv
    A JSON object of random hexadecimal keys and values; the value of one key is asked.
vartrack
    Variable assignments spread through filler text, ``VAR apple = 12345`` then
    ``VAR river = VAR apple``; the value held by the end of a chain is asked (one hop by
    default, see :data:`VARTRACK_HOPS`).

The haystack is made of composed plain sentences (subject, action, setting) drawn from the
sample's RNG; the bundled 135M model retrieves far better from this varied text than from a
short list of repeated sentences (see ``notes/calibration.md``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUNDLED_DENSE_OK",
    "DEPTHS",
    "FILLER",
    "FILLER_ACTIONS",
    "FILLER_SENTENCES",
    "FILLER_SETTINGS",
    "FILLER_SUBJECTS",
    "TASKS",
    "Sample",
    "TaskSpec",
    "make_samples",
    "max_new_tokens",
    "score",
    "token_count",
]

#: Needle depths cycled through by sample index (0 = start of the context, 1 = end).
DEPTHS: tuple[float, ...] = tuple(i / 10 for i in range(11))

#: Plain, unrelated sentences; shuffled per sample to make the haystack (``FILLER = "fixed"``).
FILLER_SENTENCES: tuple[str, ...] = (
    "The morning bus was a few minutes late again.",
    "A small dog slept in the shade of the porch.",
    "Fresh bread is sold at the corner bakery every day.",
    "The river runs slowly past the old stone mill.",
    "Children played football in the park after school.",
    "The library closes early on Sunday afternoons.",
    "Rain is expected later in the week.",
    "She planted tomatoes and beans in the garden.",
    "The kettle whistled while the soup was warming.",
    "Most of the shops in the village open at nine.",
    "A gentle wind moved the leaves of the tall trees.",
    "He painted the fence white last summer.",
    "The train to the city leaves from platform two.",
    "Our neighbors keep three chickens in their yard.",
    "The museum has a new room for old maps.",
    "Snow covered the hills for most of the winter.",
    "The market sells apples, pears and plums in autumn.",
    "A tired cyclist stopped to drink some water.",
    "The clock in the hall needs a new battery.",
    "Two boats were tied up at the end of the pier.",
    "The teacher wrote the date on the board.",
    "Coffee tastes better with a little milk.",
    "The road to the farm is narrow and quiet.",
    "Birds gathered on the roof before the storm.",
    "He read the newspaper on the long train ride.",
    "The lamp on the desk gives a warm yellow light.",
    "A cat watched the fish in the small pond.",
    "The bridge was repaired during the spring.",
    "Lunch was served at noon in the big hall.",
    "The hikers followed the trail up the green valley.",
    "Her bicycle has a basket on the front.",
    "The window looks out over a field of wheat.",
    "Somebody left an umbrella on the bench.",
    "The baker starts work long before sunrise.",
    "Clouds drifted slowly across the blue sky.",
    "The post office is next to the pharmacy.",
    "A farmer drove his tractor along the lane.",
    "The soup needed a pinch more salt.",
    "Streetlights came on as the evening grew dark.",
    "The old piano in the corner is out of tune.",
    "They walked along the beach and collected shells.",
    "The garden gate creaks when it is opened.",
    "Ducks swam in a line across the lake.",
    "The bookshop sells maps and postcards too.",
    "A pot of tea was left to cool on the table.",
    "The sun set behind the mountains at seven.",
    "He fixed the bicycle chain with a small tool.",
    "The meeting was moved to Thursday morning.",
)

#: Parts of composed filler sentences (``FILLER = "composed"``): subject, action, setting.
#: About 40 x 40 x 40 combinations, so sentences rarely repeat even in an 8k-token haystack.
FILLER_SUBJECTS: tuple[str, ...] = (
    "The old farmer", "A young teacher", "My neighbor", "The tired driver", "A quiet student",
    "The local baker", "Her little brother", "The new doctor", "A friendly waiter",
    "The school nurse", "An elderly couple", "The shop owner", "A group of children",
    "The night guard", "His cousin", "The village priest", "A busy mother", "The postman",
    "Two fishermen", "The librarian", "A tall stranger", "The young painter", "Our landlord",
    "The bus driver", "A small girl", "The gardener", "My aunt", "The football coach",
    "A careful builder", "The museum guide", "Three hikers", "The mayor", "A retired sailor",
    "The music teacher", "Her grandfather", "A shy boy", "The cook", "The farmer's wife",
    "A lonely poet", "The station master",
)
FILLER_ACTIONS: tuple[str, ...] = (
    "carried a basket of apples", "painted the wooden fence", "read an old newspaper",
    "fed the hungry ducks", "repaired a broken chair", "watched the clouds drift by",
    "baked a loaf of brown bread", "planted a row of onions", "walked the brown dog",
    "swept the dusty floor", "wrote a long letter", "sang a quiet song", "cleaned the windows",
    "picked some wild flowers", "washed the blue car", "sold a few jars of honey",
    "lost a warm scarf", "found an empty bottle", "climbed the steep hill",
    "cooked a pot of soup", "fixed the garden gate", "counted the sheep",
    "drew a map of the town", "opened a small shop", "carried the heavy boxes",
    "played an old guitar", "built a little boat", "folded the clean laundry",
    "chopped some firewood", "hung the wet clothes", "visited an old friend",
    "bought a bag of rice", "mended a torn coat", "fished for a few hours",
    "rang the church bell", "polished the silver spoons", "tidied the messy shelves",
    "brushed the tired horse", "collected smooth stones", "locked the back door",
)
FILLER_SETTINGS: tuple[str, ...] = (
    "near the river", "in the early morning", "after a long lunch", "behind the old barn",
    "before the rain started", "at the edge of the village", "on a cold afternoon",
    "beside the railway station", "under the big oak tree", "in the crowded market",
    "during the summer fair", "on the way home", "at the top of the street",
    "next to the bakery", "in the quiet garden", "late in the evening", "on a windy day",
    "by the small harbor", "outside the town hall", "in the empty square",
    "near the stone bridge", "after the storm", "at the end of the week", "inside the warm kitchen",
    "close to the forest", "on a sunny morning", "in the narrow lane", "beside the pond",
    "at the busy crossroads", "before the sun went down", "in the old library",
    "behind the church", "on the green hill", "during the winter holidays",
    "in front of the cinema", "along the sandy beach", "near the post office",
    "at the school gate", "in the back yard", "under a grey sky",
)

#: Haystack style: "composed" (varied sentences, default) or "fixed" (shuffled FILLER_SENTENCES).
FILLER = "composed"

#: Plain words used as needle keys (``multikey``, ``multivalue``) and variable names.
KEY_WORDS: tuple[str, ...] = (
    "apple", "river", "candle", "garden", "mirror", "pencil", "orange", "window", "rabbit",
    "castle", "ladder", "pepper", "violin", "blanket", "turtle", "helmet", "basket", "dragon",
    "button", "jacket", "lemon", "forest", "hammer", "tiger", "rocket", "saddle", "kitten",
    "anchor", "banana", "cactus", "donkey", "feather", "guitar", "island", "marble", "napkin",
)

# Task sizes, chosen by calibrating dense attention on the bundled SmolLM2-135M model
# (notes/calibration.md). Modules may override them before calling make_samples.
PASSKEY_DIGITS = 5
MULTIKEY_NEEDLES = 2
MULTIKEY_DIGITS = 5
MULTIVALUE_VALUES = 2
MULTIVALUE_DIGITS = 4
#: "ordinal": one value asked by the list it belongs to; "all": every value asked (harder).
MULTIVALUE_MODE = "ordinal"
KV_KEY_HEX = 8
VARTRACK_CHAINS = 2
VARTRACK_HOPS = (1,)
VARTRACK_DIGITS = 5


@dataclass(frozen=True)
class Sample:
    """One generated prompt with its expected answer.

    Attributes
    ----------
    task : str
        Task kind, a key of :data:`TASKS`.
    length : int
        Requested context length in tokens; ``prompt`` plus the answer fits inside it.
    seed : int
        Seed given to :func:`make_samples`.
    index : int
        Position of the sample in the generated list (also picks the needle depth).
    prompt : str
        Plain-completion prompt; the model should continue it with ``answer``.
    answer : str
        Expected continuation, with its leading space where the prompt ends before one.
    depth : float or None
        Relative position of the asked needle in the context (0 = start, 1 = end), or ``None``
        when the task has no single needle position.
    """

    task: str
    length: int
    seed: int
    index: int
    prompt: str
    answer: str
    depth: float | None


#: A render function maps a number of filler units to ``(prompt, answer)``.
Render = Callable[[int], tuple[str, str]]


@dataclass(frozen=True)
class TaskSpec:
    """How to build and score one task kind.

    Attributes
    ----------
    name : str
        Registry name.
    description : str
        One line for command-line help.
    max_new_tokens : int
        Tokens to generate for the answer; also reserved inside ``length``.
    build : callable
        ``build(rng, depth) -> render``; draws every random choice up front and returns a
        deterministic ``render(n_units) -> (prompt, answer)`` whose prompt grows with
        ``n_units`` (filler sentences or key-value pairs).
    scorer : callable
        ``scorer(sample, generated_text) -> bool``.
    """

    name: str
    description: str
    max_new_tokens: int
    build: Callable[[random.Random, float], Render]
    scorer: Callable[[Sample, str], bool]


# ----------------------------------------------------------------------------- helpers


def _number(rng: random.Random, digits: int) -> str:
    """A random decimal number with exactly ``digits`` digits (no leading zero)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _distinct_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    """``count`` distinct random numbers of ``digits`` digits."""
    seen: list[str] = []
    while len(seen) < count:
        value = _number(rng, digits)
        if value not in seen:
            seen.append(value)
    return seen


class _FillerStream:
    """Endless, deterministic sequence of shuffled filler sentences.

    Why: the prompt is sized by searching over the number of filler sentences, so the sentence
    order must not depend on how many are requested.
    """

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._items: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._items) < n:
            if FILLER == "fixed":
                block = list(FILLER_SENTENCES)
                self._rng.shuffle(block)
                self._items.extend(block)
            else:
                rng = self._rng
                self._items.append(f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_ACTIONS)} "
                                   f"{rng.choice(FILLER_SETTINGS)}.")
        return self._items[:n]


def _haystack(filler: _FillerStream, n: int, needles: Sequence[tuple[float, str]]) -> str:
    """Join ``n`` filler sentences with each needle inserted at its relative depth."""
    sentences = filler.take(n)
    slots: dict[int, list[str]] = {}
    for depth, text in needles:
        slots.setdefault(round(depth * n), []).append(text)
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(slots.get(i, ()))
        if i < n:
            parts.append(sentences[i])
    return " ".join(parts)


def _other_depths(rng: random.Random, count: int) -> list[float]:
    """Random depths for distractor needles."""
    return [rng.random() for _ in range(count)]


def _starts_with_answer(sample: Sample, generated: str) -> bool:
    """True when the continuation starts with the answer and the answer is not cut mid-word.

    Why the word-boundary check: an answer ``48213`` must not count as found in ``482130``.
    """
    text = generated.lstrip()
    answer = sample.answer.strip()
    if not text.startswith(answer):
        return False
    rest = text[len(answer):]
    return not (rest and rest[0].isalnum())


def _score_multivalue(sample: Sample, generated: str) -> bool:
    """One asked value: it must start the continuation; several: all must appear.

    Why: in ``"all"`` mode the model may list the values in any order or format.
    """
    values = [v.strip() for v in sample.answer.split(",") if v.strip()]
    if len(values) == 1:
        return _starts_with_answer(sample, generated)
    return all(re.search(rf"(?<![0-9A-Za-z]){re.escape(v)}(?![0-9A-Za-z])", generated)
               for v in values)


# ----------------------------------------------------------------------------- task builders


def _build_passkey(rng: random.Random, depth: float) -> Render:
    key = _number(rng, PASSKEY_DIGITS)
    filler = _FillerStream(rng.getrandbits(64))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = ("There is a pass key hidden inside the following text. "
            "Find it and remember it, you will be asked for it at the end.\n\n")
    tail = "\n\nWhat is the pass key? The pass key is"

    def render(n: int) -> tuple[str, str]:
        return head + _haystack(filler, n, [(depth, needle)]) + tail, " " + key

    return render


def _build_multikey(rng: random.Random, depth: float) -> Render:
    words = rng.sample(KEY_WORDS, MULTIKEY_NEEDLES)
    values = _distinct_numbers(rng, MULTIKEY_NEEDLES, MULTIKEY_DIGITS)
    depths = [depth, *_other_depths(rng, MULTIKEY_NEEDLES - 1)]
    filler = _FillerStream(rng.getrandbits(64))
    needles = [(d, f"The special magic number for {w} is {v}.")
               for d, w, v in zip(depths, words, values, strict=True)]
    needles.sort(key=lambda item: item[0])
    head = ("Some special magic numbers are hidden inside the following text. "
            "Remember them, you will be asked for one of them at the end.\n\n")
    tail = (f"\n\nWhat is the special magic number for {words[0]}? "
            f"The special magic number for {words[0]} is")

    def render(n: int) -> tuple[str, str]:
        return head + _haystack(filler, n, needles) + tail, " " + values[0]

    return render


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


def _build_multivalue(rng: random.Random, depth: float) -> Render:
    word = rng.choice(KEY_WORDS)
    values = _distinct_numbers(rng, MULTIVALUE_VALUES, MULTIVALUE_DIGITS)
    others = sorted(_other_depths(rng, MULTIVALUE_VALUES - 1))
    filler = _FillerStream(rng.getrandbits(64))
    if MULTIVALUE_MODE == "all":
        depths = sorted([depth, *others])
        needles = [(d, f"One of the special magic numbers for {word} is {v}.")
                   for d, v in zip(depths, values, strict=True)]
        head = (f"Several special magic numbers for {word} are hidden inside the following text. "
                "Remember all of them, you will be asked for them at the end.\n\n")
        tail = (f"\n\nWhat are all the special magic numbers for {word}? "
                f"The special magic numbers for {word} are")
        answer = " " + ", ".join(values)
    else:
        # The asked value sits at the sample's depth; ordinals follow the order of appearance.
        asked = rng.randrange(MULTIVALUE_VALUES)
        depths = others[:asked] + [depth] + others[asked:]
        depths = [min(max(d, 0.0), 1.0) for d in depths]
        order = sorted(range(MULTIVALUE_VALUES), key=lambda i: (depths[i], i))
        rank = {i: r for r, i in enumerate(order)}
        needles = [(depths[i], f"The special magic number for {word} in the {_ORDINALS[rank[i]]} "
                               f"list is {values[i]}.") for i in order]
        head = (f"{MULTIVALUE_VALUES} special magic numbers for {word} are hidden inside the "
                "following text. Remember them, you will be asked for one of them at the end.\n\n")
        ordinal = _ORDINALS[rank[asked]]
        tail = (f"\n\nWhat is the special magic number for {word} in the {ordinal} list? "
                f"The special magic number for {word} in the {ordinal} list is")
        answer = " " + values[asked]

    def render(n: int) -> tuple[str, str]:
        return head + _haystack(filler, n, needles) + tail, answer

    return render


def _hex_key(rng: random.Random) -> str:
    half = KV_KEY_HEX // 2
    text = "".join(rng.choice("0123456789abcdef") for _ in range(KV_KEY_HEX))
    return f"{text[:half]}-{text[half:]}"


def _build_kv(rng: random.Random, depth: float) -> Render:
    pair_rng = random.Random(rng.getrandbits(64))
    keys: list[str] = []
    values: list[str] = []
    seen: set[str] = set()

    def draw_pairs(n: int) -> None:
        while len(keys) < n:
            key, value = _hex_key(pair_rng), _hex_key(pair_rng)
            if key in seen or value in seen:
                continue
            seen.update((key, value))
            keys.append(key)
            values.append(value)

    head = ("Below is a JSON object with many keys and values. "
            "You will be asked for the value of one key at the end.\n\n")

    def render(n: int) -> tuple[str, str]:
        n = max(n, 1)
        draw_pairs(n)
        asked = min(round(depth * (n - 1)), n - 1)
        body = ",\n".join(f'  "{k}": "{v}"' for k, v in zip(keys[:n], values[:n], strict=True))
        tail = f'\n\nIn the JSON object above, the value of the key "{keys[asked]}" is "'
        return head + "{\n" + body + "\n}" + tail, values[asked]

    return render


def _build_vartrack(rng: random.Random, depth: float) -> Render:
    hops = [rng.choice(VARTRACK_HOPS) for _ in range(VARTRACK_CHAINS)]
    names = rng.sample(KEY_WORDS, sum(h + 1 for h in hops))
    values = _distinct_numbers(rng, VARTRACK_CHAINS, VARTRACK_DIGITS)
    filler = _FillerStream(rng.getrandbits(64))
    needles: list[tuple[float, str]] = []
    asked = ""
    start = 0
    for c, h in enumerate(hops):
        chain = names[start:start + h + 1]
        start += h + 1
        if c == 0:
            # The asked chain ends at the sample's depth; its earlier links come before it.
            asked = chain[-1]
            depths = sorted(depth * rng.random() for _ in range(h)) + [depth]
        else:
            depths = sorted(rng.random() for _ in range(h + 1))
        needles.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
        for d, prev, cur in zip(depths[1:], chain[:-1], chain[1:], strict=True):
            needles.append((d, f"VAR {cur} = VAR {prev}."))
    needles.sort(key=lambda item: item[0])
    head = ("Variable assignments are hidden inside the following text. "
            "Keep track of the value of every variable.\n\n")
    tail = f"\n\nQuestion: what is the value of VAR {asked}? Answer: VAR {asked} ="
    answer = " " + values[0]

    def render(n: int) -> tuple[str, str]:
        return head + _haystack(filler, n, needles) + tail, answer

    return render


def _first_number_is_value(sample: Sample, generated: str) -> bool:
    """True when the first number in the continuation is the answer's number.

    Why: the model may restate the variable (``VAR a = 12345``) before the value, so the first
    number it writes is judged rather than the first characters.
    """
    expected = re.findall(r"\d+", sample.answer)[-1]
    found = re.search(r"\d+", generated)
    return found is not None and found.group() == expected


#: Task settings where dense attention on the bundled SmolLM2-135M model scored >= 80% on CPU
#: (task -> context lengths; notes/calibration.md). Studies of the bundled model should keep to
#: these: elsewhere a sparse method cannot be told apart from a model that fails anyway.
BUNDLED_DENSE_OK: dict[str, tuple[int, ...]] = {"passkey": (1024, 2048), "multikey": (1024, 2048)}

#: Registry of task kinds, read by the command-line interface.
TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec("passkey", "single five-digit pass key in filler text", 8,
                        _build_passkey, _starts_with_answer),
    "multikey": TaskSpec("multikey", "several word->number needles, one asked", 8,
                         _build_multikey, _starts_with_answer),
    "multivalue": TaskSpec("multivalue", "one word with a number per list, one list asked", 16,
                           _build_multivalue, _score_multivalue),
    "kv": TaskSpec("kv", "JSON object of random hex keys and values, one value asked", 12,
                   _build_kv, _starts_with_answer),
    "vartrack": TaskSpec("vartrack", "chained variable assignments, final value asked", 8,
                         _build_vartrack, _first_number_is_value),
}


# ----------------------------------------------------------------------------- public API


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        known = ", ".join(sorted(TASKS))
        raise ValueError(f"unknown task {task!r}; choose one of: {known}")
    return TASKS[task]


def max_new_tokens(task: str) -> int:
    """Number of tokens to generate when answering ``task``.

    Why: the answers are short, so generating only a few tokens keeps evaluation cheap; the
    same number of tokens is reserved inside ``length`` when sizing prompts.

    Parameters
    ----------
    task : str
        Task kind, a key of :data:`TASKS`.

    Returns
    -------
    int
        Tokens to generate.

    Raises
    ------
    ValueError
        If ``task`` is unknown.
    """
    return _spec(task).max_new_tokens


def token_count(text: str, tokenizer: Any) -> int:
    """Number of tokens ``tokenizer`` gives for ``text``, special tokens included.

    Parameters
    ----------
    text : str
        Text to measure.
    tokenizer : Any
        A Hugging Face tokenizer, or any object with ``encode(text) -> list[int]``.

    Returns
    -------
    int
        Token count as the model will see it.
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise TypeError(
            f"tokenizer of type {type(tokenizer).__name__} has no encode(); pass a Hugging Face "
            "tokenizer or an object with encode(text) -> list[int]"
        )
    return len(encode(text))


def _fit(render: Render, tokenizer: Any, budget: int) -> tuple[str, str, int]:
    """Largest ``render(n)`` whose prompt has at most ``budget`` tokens (binary search)."""
    def count(n: int) -> int:
        return token_count(render(n)[0], tokenizer)

    if count(0) > budget:
        raise ValueError(
            f"length too small: the empty prompt already has {count(0)} tokens, more than the "
            f"budget of {budget}; ask for a larger length"
        )
    lo, hi = 0, 16
    while count(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    prompt, answer = render(lo)
    return prompt, answer, token_count(prompt, tokenizer)


def make_samples(
    task: str, n: int, length: int, tokenizer: Any, seed: int = 0
) -> list[Sample]:
    """Generate ``n`` deterministic samples of ``task`` sized to ``length`` tokens.

    Each prompt has at most ``length - max_new_tokens(task)`` tokens with ``tokenizer``, so the
    prompt and the generated answer fit inside ``length``; prompts are filled up to that budget
    (within a few percent). Sample ``i`` depends only on ``(task, length, seed, i)``, and its
    needle depth cycles through :data:`DEPTHS`.

    Parameters
    ----------
    task : str
        Task kind, a key of :data:`TASKS`.
    n : int
        Number of samples, at least 1.
    length : int
        Context length in tokens (prompt plus answer).
    tokenizer : Any
        Tokenizer of the model to evaluate (prompt sizes are measured with it).
    seed : int, optional
        Seed; the same seed gives identical samples.

    Returns
    -------
    list of Sample
        ``n`` samples with ``index`` 0 to ``n - 1``.

    Raises
    ------
    ValueError
        If ``task`` is unknown, ``n`` < 1, or ``length`` is too small for the task.
    """
    spec = _spec(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer number of tokens, got {length!r}")
    budget = length - spec.max_new_tokens
    samples: list[Sample] = []
    for index in range(n):
        rng = random.Random(f"{task}:{length}:{seed}:{index}")
        depth = DEPTHS[index % len(DEPTHS)]
        prompt, answer, _ = _fit(spec.build(rng, depth), tokenizer, budget)
        samples.append(Sample(task, length, seed, index, prompt, answer, depth))
    return samples


def score(sample: Sample, generated_text: str) -> bool:
    """Whether ``generated_text`` (the continuation only) answers ``sample`` correctly.

    Most tasks require the continuation, leading whitespace removed, to start with the answer
    (not followed by a letter or digit); ``multivalue`` requires every value to appear.

    Parameters
    ----------
    sample : Sample
        The sample that was prompted.
    generated_text : str
        Decoded continuation, without the prompt.

    Returns
    -------
    bool
        True when correct.
    """
    return _spec(sample.task).scorer(sample, generated_text)
