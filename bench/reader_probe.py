"""What the pseudo-token stage reads from a clip by itself, and what the global expert adds to it.

    python bench/reader_probe.py                          # four sets x two readers, 2000 steps each, ~7 min
    python bench/reader_probe.py --sets level --steps 500 # a quick look at one set
    python bench/reader_probe.py --sets key --train-size 16384 --free-tokens   # tokens not rescaled
    python bench/reader_probe.py --sets key --readers fusion_module,fusion_no_global --lr 1e-3   # the whole module
    python bench/reader_probe.py --sets key --readers llm_linear,llm_text --lr 1e-3   # ... read by the tiny LLM

The pseudo-token stage (K learned queries attending over the fused sequence) is
a reader of the whole clip in its own right: any average over the clip, and many
functions of such averages, reach the LLM through it without the global expert.
This probe measures that on audio-only synthetic sets, with the model's own parts
(front end, time encoding, local and global experts, pseudo tokens) and a small
MLP over the K tokens in place of the LLM, trained on the score with a squared
error:

- drift: a weak trend along one direction over the whole clip (an aggregate);
- level: three marked events, each above or below the level that its clip holds
  on every other frame; score = events above minus events below (each event
  against its clip);
- pair: six marked events with random directions; score +1 when two of them share
  a direction, -1 when none do (a relation between distant frames whose content
  changes from clip to clip, which no fixed query can pick out);
- key: four marked events, each with a value and an angle drawn for each clip, and
  one key event with an angle; score = the value of the event whose angle is
  nearest the key's (a look-up between distant frames by a content that changes
  from clip to clip, in a two-dimensional key space);
- key2: the same look-up among two value events (not in the default run).

Readers (--readers): the local expert and the pseudo tokens, and the same with the
global expert beside the local one (their outputs averaged: a uniform level-2 gate);
and the demo recipe's whole fusion module (all three experts, the level-2 gate and
its auxiliary losses; text and vision one constant frame each), with and without
the global expert, which also reports the level-2 gate it gives each expert on the
test clips; and that module's K tokens in a short prompt for the demo's tiny LLM
with the demo recipe's LoRA, answered by a linear read of its last hidden state
(squared error), by its own text answer as the model writes and decodes it
(cross-entropy on the answer's tokens, constrained decoding), or by the text answer
trained with the linear read's loss added. Each pseudo token is rescaled to RMS 1,
as the model does by default; with --free-tokens their magnitude is free
(fusion.normalised_tokens = false).
Prints test MAE per set and reader next to always answering the median and to
the rule that answers the set by hand from its frames (about the best a reader can
do: it reads each value from one noisy frame, where a model may use more); figures
are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import math
import sys
import tempfile
import time

import torch
from results import add_json_argument, comma_list, write_results
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from egmf.model.config import PromptConfig
from egmf.model.decoding import weighted_median
from egmf.model.experts import GlobalExpert, LocalExpert, masked_mean
from egmf.model.fusion import FrontEnd, FusionModule, PseudoTokens, TimeEncoding
from egmf.model.llm import add_lora
from egmf.model.prompt import PromptBuilder
from egmf.model.tiny import build_tiny_llm
from egmf.train.config import load_config
from egmf.train.main import DEFAULT_RECIPE

FRAMES, DIM = 32, 16
LEVEL_AXIS, MARKER_AXIS = 0, 1  # the two fixed directions of the feature space; the rest carry content
KEY_MARKER_AXIS, KEY_PLANE = 2, [3, 4]  # the key set's: the key event's marker, and the plane of the angles
KEY_SLOTS = 12  # the key set's angles sit near 12 slots 30 degrees apart; the noise moves one by about 6


def random_directions(count: int, gen: torch.Generator) -> torch.Tensor:
    """Unit vectors in the content dimensions (orthogonal to the level and marker axes)."""
    d = torch.randn(count, DIM, generator=gen)
    d[:, [LEVEL_AXIS, MARKER_AXIS]] = 0
    return d / d.norm(dim=-1, keepdim=True)


def event_positions(count: int, gap: int, gen: torch.Generator) -> torch.Tensor:
    """`count` frames at least `gap` apart."""
    slots = torch.randperm(FRAMES // gap, generator=gen)[:count]
    return slots * gap + torch.randint(0, gap, (count,), generator=gen)


def drift_clip(gen: torch.Generator) -> tuple[torch.Tensor, float]:
    score = float(torch.empty(()).uniform_(-3, 3, generator=gen))
    clip = torch.randn(FRAMES, DIM, generator=gen)
    clip[:, LEVEL_AXIS] += score * torch.linspace(-0.5, 0.5, FRAMES)
    return clip, score


def level_clip(gen: torch.Generator) -> tuple[torch.Tensor, float]:
    clip = 0.3 * torch.randn(FRAMES, DIM, generator=gen)
    level = float(torch.empty(()).uniform_(-2, 2, generator=gen))
    clip[:, LEVEL_AXIS] += level
    positions = event_positions(3, 8, gen)
    above = torch.rand(3, generator=gen) < 0.5
    offsets = torch.empty(3).uniform_(0.5, 2.0, generator=gen) * torch.where(above, 1.0, -1.0)
    clip[positions, MARKER_AXIS] += 3.0
    clip[positions, LEVEL_AXIS] = level + offsets
    return clip, float(above.sum() - (~above).sum())


def pair_clip(gen: torch.Generator) -> tuple[torch.Tensor, float]:
    clip = 0.3 * torch.randn(FRAMES, DIM, generator=gen)
    directions = random_directions(6, gen)
    shared = bool(torch.rand((), generator=gen) < 0.5)
    if shared:
        first, second = torch.randperm(6, generator=gen)[:2].tolist()
        directions[second] = directions[first]
    positions = event_positions(6, 5, gen)
    clip[positions] += 3.0 * directions
    clip[positions, MARKER_AXIS] += 3.0
    return clip, 1.0 if shared else -1.0


def on_circle(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack([angles.cos(), angles.sin()], -1)


def key_clip(gen: torch.Generator, count: int = 4) -> tuple[torch.Tensor, float]:
    """`count` value events and a key event (at most 4 + 1 fit the clip 6 frames apart)."""
    clip = 0.3 * torch.randn(FRAMES, DIM, generator=gen)
    jitter = 0.15 * 2 * math.pi / KEY_SLOTS
    angles = torch.randperm(KEY_SLOTS, generator=gen)[:count] * 2 * math.pi / KEY_SLOTS
    angles = angles + (torch.rand(count, generator=gen) - 0.5) * jitter
    values = torch.empty(count).uniform_(-2, 2, generator=gen)
    target = int(torch.randint(0, count, (), generator=gen))
    key = angles[target] + (torch.rand((), generator=gen) - 0.5) * jitter
    positions = event_positions(count + 1, 6, gen)
    events, key_position = positions[:count], positions[count]
    clip[events, MARKER_AXIS] += 3.0
    clip[events, LEVEL_AXIS] += values
    clip[events[:, None], KEY_PLANE] += 3.0 * on_circle(angles)
    clip[key_position, KEY_MARKER_AXIS] += 3.0
    clip[key_position, KEY_PLANE] += 3.0 * on_circle(key)
    return clip, float(values[target])


SETS = {
    "drift": drift_clip,
    "level": level_clip,
    "pair": pair_clip,
    "key": key_clip,
    "key2": functools.partial(key_clip, count=2),
}
DEFAULT_SETS = ["drift", "level", "pair", "key"]


# The rules that answer each set from the frames by hand: about the best a reader can do, and a check that each
# set's score is carried by the frames the way its description says.
def drift_rule(clips: torch.Tensor) -> torch.Tensor:
    """The least-squares trend along the level axis (the noise of the frames leaves it about 0.5 off)."""
    ramp = torch.linspace(-0.5, 0.5, FRAMES)
    return clips[..., LEVEL_AXIS] @ ramp / ramp.pow(2).sum()


def marked(clips: torch.Tensor, axis: int = MARKER_AXIS) -> torch.Tensor:
    return clips[..., axis] > 1.5  # events carry 3 on their marker axis; other frames noise of 0.3


def level_rule(clips: torch.Tensor) -> torch.Tensor:
    events = marked(clips)
    level = (clips[..., LEVEL_AXIS] * ~events).sum(1) / (~events).sum(1)
    offsets = torch.where(events, clips[..., LEVEL_AXIS] - level[:, None], 0.0)
    return ((offsets > 0).sum(1) - (offsets < 0).sum(1)).float()


def pair_rule(clips: torch.Tensor) -> torch.Tensor:
    events = clips[marked(clips)].view(len(clips), -1, DIM).clone()
    events[..., [LEVEL_AXIS, MARKER_AXIS]] = 0
    content = events / events.norm(dim=-1, keepdim=True)
    closest = (content @ content.transpose(1, 2) - 2 * torch.eye(events.shape[1])).amax((1, 2))
    return torch.where(closest > 0.75, 1.0, -1.0)


def key_rule(clips: torch.Tensor) -> torch.Tensor:
    events = clips[marked(clips)].view(len(clips), -1, DIM)
    key = clips[marked(clips, KEY_MARKER_AXIS)]  # one key event per clip
    nearest = (events[..., KEY_PLANE] @ key[:, KEY_PLANE, None]).squeeze(-1).argmax(1)
    return events[torch.arange(len(clips)), nearest, LEVEL_AXIS]


RULES = {"drift": drift_rule, "level": level_rule, "pair": pair_rule, "key": key_rule, "key2": key_rule}
TEST_SIZE = 1024
TEST_BATCH = 32
"""Test clips per forward pass: the text reader scores every candidate answer of each clip at once."""


def make_split(name: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clips, scores = zip(*(SETS[name](gen) for _ in range(size)), strict=True)
    return torch.stack(clips), torch.tensor(scores)


class ScoreReader(nn.Module):
    """What the training loop asks of a reader: a loss on a batch and its answers, and the hooks of a level-2 gate
    (none here: no auxiliary loss, nothing recorded). This base reads the score as its output, with a squared
    error."""

    def loss(self, audio: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return (self(audio) - scores).pow(2).mean()

    def predict(self, audio: torch.Tensor) -> torch.Tensor:
        return self(audio)

    def set_training_progress(self, progress: float) -> None:
        pass

    def auxiliary_loss(self) -> torch.Tensor | float:
        return 0.0

    def after_step(self) -> None:
        pass

    def expert_weights(self) -> dict[str, float] | None:
        return None


class Reader(ScoreReader):
    """Audio-only fusion: front end + time -> experts (averaged) -> K pseudo tokens -> MLP -> score."""

    def __init__(self, with_global: bool, normalised_tokens: bool, width: int = 64, heads: int = 4, tokens: int = 8):
        super().__init__()
        self.width = width
        self.front, self.time = FrontEnd(DIM, width), TimeEncoding(width, 8)
        self.context = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.experts = nn.ModuleList([LocalExpert(width, 3, 0.0)])
        if with_global:
            self.experts.append(GlobalExpert(width, heads, 2, 0.0, "sdpa", scope="modality"))
        self.pseudo = PseudoTokens(width, heads, tokens, width, 1.0, "sdpa", normalised_tokens)
        self.head = nn.Sequential(nn.Linear(tokens * width, 128), nn.GELU(), nn.Linear(128, 1))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        b, width = audio.shape[0], self.width
        mask = torch.ones(audio.shape[:2], dtype=torch.bool)
        x = self.front(audio) + self.time(mask)
        # The experts take text, audio and vision; here text and vision are one padded (absent) frame each.
        absent, absent_mask = torch.zeros(b, 1, width), torch.zeros(b, 1, dtype=torch.bool)
        xs, masks = [absent, x, absent], [absent_mask, mask, absent_mask]
        context = self.context(masked_mean(x, mask))
        fused = torch.stack([expert(xs, masks, context)[0][1] for expert in self.experts]).mean(0)
        return self.head(self.pseudo(fused, mask).flatten(1)).squeeze(-1)


class FusionReader(ScoreReader):
    """The demo recipe's fusion module with the given experts, as the trainer runs it (level-2 gate, its noise and
    warm-up, its auxiliary losses weighted as the model weighs them), and an MLP over its K tokens. The set's clip
    is the audio; text and vision are one constant frame each."""

    def __init__(self, experts: list[str], normalised_tokens: bool, token_width: int = 64, token_rms: float = 1.0):
        super().__init__()
        overrides = [f"--fusion.experts={experts}", "--fusion.attention=sdpa"]
        overrides.append(f"--fusion.normalised_tokens={str(normalised_tokens).lower()}")
        self.cfg = load_config(DEFAULT_RECIPE, overrides).fusion
        self.fusion = FusionModule(self.cfg, {"probe": (DIM, 1)}, llm_hidden=token_width, llm_embed_rms=token_rms)
        self.head = nn.Sequential(
            nn.Linear(self.cfg.num_pseudo_tokens * token_width, 128), nn.GELU(), nn.Linear(128, 1)
        )
        self.token_width, self.out = token_width, None

    def pseudo_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, K, token_width]; keeps the fusion output for the gate's hooks."""
        b = audio.shape[0]
        one_frame = torch.ones(b, 1, dtype=torch.bool)
        text, vision = torch.zeros(b, 1, self.token_width), torch.zeros(b, 1, 1)
        self.out = self.fusion(
            "probe", audio, torch.ones(audio.shape[:2], dtype=torch.bool), vision, one_frame, text, one_frame
        )
        return self.out.pseudo_tokens

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(self.pseudo_tokens(audio).flatten(1)).squeeze(-1)

    def set_training_progress(self, progress: float) -> None:
        self.fusion.set_training_progress(progress)

    def auxiliary_loss(self) -> torch.Tensor:
        return self.fusion.weighted_aux_loss(self.out.aux_losses)

    def after_step(self) -> None:
        self.fusion.record_gate_usage("probe", self.out.expert_weights.detach().mean(0))

    def expert_weights(self) -> dict[str, float]:
        """The mean level-2 gate of the last forward pass, per expert."""
        return dict(zip(self.cfg.experts, self.out.expert_weights.mean(0).tolist(), strict=True))


@functools.cache
def tiny_llm_dir() -> str:
    """The demo's tiny LLM (egmf.model.tiny, deterministic), written once per run into a temporary folder."""
    folder = tempfile.TemporaryDirectory(prefix="reader-probe-llm-")
    atexit.register(folder.cleanup)
    return build_tiny_llm(folder.name)


SCORE_DATASET = "demo_reg_en"
"""The demo set whose answers the text reader writes: one decimal, from -3.0 to +3.0 (the range of every set's
scores)."""


class LLMReader(FusionReader):
    """The whole fusion module's K tokens read by the demo's tiny LLM with the demo recipe's LoRA, in a short
    prompt: bos, the K tokens, the cue "Intensity:".

    answer "linear": a linear read of the LLM's last hidden state, trained with a squared error.
    answer "text": the LLM's own answer, " +1.3" and eos as the model writes it, trained with cross-entropy on those
    tokens (the per-token mean) and answered as constrained decoding answers (the weighted median over
    the verbaliser's candidates).
    answer "text+linear": answered as "text", trained on the sum of both losses.
    """

    def __init__(self, experts: list[str], normalised_tokens: bool, answer: str):
        llm_dir = tiny_llm_dir()
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
        embeddings = llm.get_input_embeddings().weight.detach()
        super().__init__(experts, normalised_tokens, embeddings.shape[1], float(embeddings.pow(2).mean().sqrt()))
        self.llm, self.answer = add_lora(llm, load_config(DEFAULT_RECIPE).lora, gradient_checkpointing=False), answer
        self.head = nn.Linear(embeddings.shape[1], 1) if "linear" in answer else None
        prompts = PromptBuilder(PromptConfig(), tokenizer, self.cfg.num_pseudo_tokens)
        self.verbaliser = prompts.verbaliser(SCORE_DATASET)
        self.register_buffer("prefix_ids", torch.tensor([tokenizer.bos_token_id]), persistent=False)
        self.register_buffer("cue_ids", torch.tensor(prompts.tokens("Intensity:")), persistent=False)
        answers = prompts.candidate_tokens(SCORE_DATASET)  # as the model writes and scores them
        if len({len(ids) for ids in answers}) != 1:
            raise ValueError(f"the tiny tokenizer splits the score answers into different lengths: {answers[:3]}")
        self.register_buffer("candidate_ids", torch.tensor(answers), persistent=False)

    def prompt(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 1 + K + cue, width]: the prompt's input embeddings."""
        tokens = self.pseudo_tokens(audio)
        b, embed = len(audio), self.llm.get_input_embeddings()
        return torch.cat([embed(self.prefix_ids).expand(b, -1, -1), tokens, embed(self.cue_ids).expand(b, -1, -1)], 1)

    def answer_log_probs(self, prompt: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """[B, A] summed log-probability of answers [B, A, T] after each prompt [B, P, width]."""
        b, a, t = answers.shape
        rows = torch.cat([prompt.repeat_interleave(a, 0), self.llm.get_input_embeddings()(answers.flatten(0, 1))], 1)
        # The logits at the last prompt position and at every answer token but the last (eos) predict the answer.
        logits = self.llm(inputs_embeds=rows, use_cache=False, logits_to_keep=t + 1).logits[:, :-1]
        chosen = logits.float().log_softmax(-1).gather(-1, answers.flatten(0, 1)[..., None])
        return chosen.view(b, a, t).sum(-1)

    def linear_read(self, prompt: torch.Tensor) -> torch.Tensor:
        """[B]: the linear read of the LLM's last hidden state at the prompt's last position."""
        hidden = self.llm(inputs_embeds=prompt, output_hidden_states=True, use_cache=False).hidden_states
        return self.head(hidden[-1][:, -1]).squeeze(-1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.linear_read(self.prompt(audio))

    def loss(self, audio: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt(audio)
        loss = torch.zeros(())
        if "linear" in self.answer:
            loss = loss + (self.linear_read(prompt) - scores).pow(2).mean()
        if "text" in self.answer:
            candidates = self.verbaliser.candidates()
            index = [candidates.index(self.verbaliser.verbalise(score)) for score in scores.tolist()]
            answers = self.candidate_ids[index][:, None]
            loss = loss - self.answer_log_probs(prompt, answers).mean() / answers.shape[-1]
        return loss

    def predict(self, audio: torch.Tensor) -> torch.Tensor:
        if self.answer == "linear":
            return self(audio)
        answers = self.candidate_ids[None].expand(len(audio), -1, -1)
        best = weighted_median(self.answer_log_probs(self.prompt(audio), answers))
        return torch.tensor([self.verbaliser.candidate_label(i) for i in best.tolist()])


ALL_EXPERTS = ["local", "semantic", "global"]
READERS = {
    "pseudo_tokens": ("local expert + pseudo tokens", lambda free: Reader(False, not free)),
    "with_global": ("+ global expert", lambda free: Reader(True, not free)),
    "fusion_module": ("fusion module", lambda free: FusionReader(ALL_EXPERTS, not free)),
    "fusion_no_global": ("fusion module without global", lambda free: FusionReader(["local", "semantic"], not free)),
    "llm_linear": ("fusion module + LLM, linear read", lambda free: LLMReader(ALL_EXPERTS, not free, "linear")),
    "llm_linear_no_global": (
        "fusion module without global + LLM, linear read",
        lambda free: LLMReader(["local", "semantic"], not free, "linear"),
    ),
    "llm_text": ("fusion module + LLM, text answer", lambda free: LLMReader(ALL_EXPERTS, not free, "text")),
    "llm_text_and_linear": (
        "fusion module + LLM, text answer trained with the linear read",
        lambda free: LLMReader(ALL_EXPERTS, not free, "text+linear"),
    ),
}
"""Each reader's name in the results: its column title and its model (given whether the tokens are free)."""


def train_and_test(train: tuple, test: tuple, reader: str, free_tokens: bool, steps: int, seed: int, lr: float) -> dict:
    """`train`, `test`: (clips, scores) of one set."""
    (x_train, y_train), (x_test, y_test) = train, test
    torch.manual_seed(seed)
    model = READERS[reader][1](free_tokens)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        model.set_training_progress(step / steps)
        batch = torch.randint(0, len(x_train), (32,), generator=gen)
        loss = model.loss(x_train[batch], y_train[batch])
        optimizer.zero_grad()
        (loss + model.auxiliary_loss()).backward()
        optimizer.step()
        model.after_step()
    model.eval()
    predicted, gates, sizes = [], [], []
    with torch.no_grad():
        for clips in x_test.split(TEST_BATCH):
            predicted.append(model.predict(clips))
            gates.append(model.expert_weights())
            sizes.append(len(clips))
    return {
        "mae": (torch.cat(predicted) - y_test).abs().mean().item(),
        "train_loss": loss.item(),
        "seconds": time.perf_counter() - start,
        "gate": mean_gate(gates, sizes),
    }


def mean_gate(gates: list[dict[str, float] | None], sizes: list[int]) -> dict[str, float] | None:
    """The level-2 gate over the whole test split from each batch's mean (None for a reader without one)."""
    if gates[0] is None:
        return None
    return {name: sum(g[name] * n for g, n in zip(gates, sizes, strict=True)) / sum(sizes) for name in gates[0]}


def run(
    sets: list[str],
    steps: int,
    seed: int,
    train_size: int,
    free_tokens: bool = False,
    readers: list[str] = ("pseudo_tokens", "with_global"),
    lr: float = 2e-3,
    test_size: int = TEST_SIZE,
) -> list[dict]:
    rows = []
    for name in sets:
        train = make_split(name, train_size, seed=1000 + seed)
        x_test, y_test = test = make_split(name, test_size, seed=2000 + seed)
        row = {
            "set": name,
            "median_mae": (y_test - y_test.median()).abs().mean().item(),
            "rule_mae": (RULES[name](x_test) - y_test).abs().mean().item(),
        }
        for reader in readers:
            row[reader] = train_and_test(train, test, reader, free_tokens, steps, seed, lr)
        rows.append(row)
    return rows


def format_cell(result: dict) -> str:
    """Test MAE (train loss at the last step) [the level-2 gate on the test clips, where there is one]."""
    cell = f"{result['mae']:.3f} ({result['train_loss']:.3f})"
    if result["gate"]:
        cell += " [" + " / ".join(f"{name} {weight:.2f}" for name, weight in result["gate"].items()) + "]"
    return cell


def format_table(rows: list[dict], steps: int, seed: int, readers: list[str], lr: float, test_size: int) -> str:
    lines = [
        f"{steps} steps x 32 clips, Adam {lr:g}, seed {seed}; test MAE over {test_size} clips (train loss at the "
        "last step) [level-2 gate on the test clips]",
        "| set | always the median | the set's rule by hand | " + " | ".join(READERS[r][0] for r in readers) + " |",
        "|---|---|---|" + "---|" * len(readers),
    ]
    for row in rows:
        cells = " | ".join(format_cell(row[r]) for r in readers)
        lines.append(f"| {row['set']} | {row['median_mae']:.3f} | {row['rule_mae']:.3f} | {cells} |")
    seconds = sum(row[r]["seconds"] for row in rows for r in readers)
    lines.append(f"training time {math.ceil(seconds)} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--test-size", type=int, default=TEST_SIZE)
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate")
    parser.add_argument(
        "--readers", default="pseudo_tokens,with_global", help=f"comma-separated, of {', '.join(READERS)}"
    )
    parser.add_argument(
        "--free-tokens", action="store_true", help="do not rescale each pseudo token (fusion.normalised_tokens = false)"
    )
    add_json_argument(parser)
    args = parser.parse_args(argv)
    sets = comma_list(parser, args.sets, SETS, "sets")
    readers = comma_list(parser, args.readers, READERS, "readers")
    rows = run(sets, args.steps, args.seed, args.train_size, args.free_tokens, readers, args.lr, args.test_size)
    print(format_table(rows, args.steps, args.seed, readers, args.lr, args.test_size))
    write_results(args.json, rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
