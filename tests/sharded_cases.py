"""The model and the engine calls of the sharded-engine tests, shared by the test (the unsharded reference)
and `sharded_worker.py` (each rank of a sharded run)."""

from __future__ import annotations

import torch

from megatron_eval_hook.engine import GenerationRequest, RequestTooLong

CHARS = "\n !\"',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = len(CHARS) + 1  # the last id ends the text
PADDED_VOCAB = 80  # the model's rows: divisible by the tensor-parallel sizes, with padding rows to mask


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def decode(tokens: list[int]) -> str:
    return "".join(CHARS[t] if t < len(CHARS) else "" for t in tokens)


def sharded_model(tp: int = 1, pp: int = 1, arch: str = "gpt"):
    """A 4-layer GPT with grouped queries (2 groups), sized so that it splits over TP=2 and PP=2; this rank's
    part under Megatron's parallel state (the whole model at TP = PP = 1). Seeded, in eval mode. `arch`:
    "gpt" (GPT-2 style: learned positions, GELU, LayerNorm, biases) or "llama" (rotary positions, SwiGLU,
    RMSNorm, no biases); both with untied embeddings."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    llama = arch == "llama"
    torch.manual_seed(0)
    style = (
        dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
             ffn_hidden_size=64, init_method_std=0.3)
        if llama
        else dict(init_method_std=0.5)
    )  # fmt: skip
    config = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32, **style,
    )  # fmt: skip
    return GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm") if llama else get_gpt_layer_local_spec(),
        vocab_size=PADDED_VOCAB,
        max_sequence_length=64,
        position_embedding_type="rope" if llama else "learned_absolute",
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).eval()


QUESTION = "Q: Which colour is the sky? A:"
# multiple-choice requests (a question with its answers), others sharing only part of a prefix, a duplicate
SCORED = [QUESTION + answer for answer in (" blue", " green", " red", " grey")] + [
    "The cat sat on the mat.",
    "The cat sat on the hat, twice.",
    "Zebras 123",
    "Q: Which colour is the sky? A: blue",
    "x",
    "A line of text that has nothing in common with the others.",
]
SCORED_FROM = [len(QUESTION)] * 4 + [1, 1, 3, 0, 0, 10]
TRUNK = "Once upon a time, "
# prompts sharing a trunk, with stop sequences met at different steps, budgets of several sizes
GENERATED = [
    (TRUNK + "a fox", 12, ("D",)),
    (TRUNK + "a dog", 9, ("j4",)),
    (TRUNK + "there", 5, ("o", "u")),
    ("Hello", 7, ()),
    ("Q: 2 and 2? A:", 3, (" ",)),
    (TRUNK + "a cat and", 1, ()),
]


def scored() -> tuple[list[list[int]], list[int]]:
    return [encode(text) for text in SCORED], list(SCORED_FROM)


def generation_requests(budget_shift: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest(encode(p), n + budget_shift, stops) for p, n, stops in GENERATED]


def generations_as_data(generations) -> list:
    return [[g.tokens, g.logprobs, g.finish_reason] for g in generations]


class Equal:
    """Scores and generations, to compare with the unsharded engine's."""

    gather_logits = False

    def before_build(self, layout) -> None:
        pass

    def after_build(self, engine, layout) -> None:
        pass

    def memory(self, model) -> int | None:
        """The bytes this rank's engine may use (None: as configured, on CPU)."""
        return None

    def drive(self, engine) -> dict:
        sequences, needed_from = scored()
        return {
            "scores": engine.score(sequences, needed_from),
            "generations": generations_as_data(engine.generate(generation_requests())),
        }


INJECTED = "injected failure in data-parallel replica 0"


class Faults(Equal):
    """A request too long for the window, a replica that fails, a call whose share is empty on some replica:
    each call's outcome, and the job's later calls still answered."""

    def after_build(self, engine, layout) -> None:
        if layout.replica != 0:
            return
        generate = engine.generate

        def failing(requests):
            if any(r.max_new_tokens == 99 for r in requests):
                raise RuntimeError(INJECTED)
            return generate(requests)

        engine.generate = failing

    def drive(self, engine) -> dict:
        outcomes = {}
        sequences, _ = scored()
        try:
            engine.score(sequences + [[1] * 65])
        except RequestTooLong as error:
            outcomes["too_long"] = str(error)
        try:
            engine.generate([GenerationRequest(encode(p), 99) for p, _, _ in GENERATED])
        except RuntimeError as error:
            outcomes["failed"] = str(error)
        outcomes["one"] = engine.score(sequences[:1])
        outcomes["none"] = engine.generate([])
        outcomes["generations"] = generations_as_data(engine.generate(generation_requests(budget_shift=1)))
        return outcomes


class BuildFails(Equal):
    """Rank 0 cannot build its engine."""

    def before_build(self, layout) -> None:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            raise MemoryError("injected: no memory for the engine on rank 0")


class Gathered(Equal):
    """As `Equal`, with the full logits gathered across the tensor-parallel group."""

    gather_logits = True


def memory_positions(rank: int) -> int:
    """The positions per pass that rank `rank`'s memory holds in the `Memory` case: in each replica of the
    layouts that run it, a rank other than the smallest must follow it, the HELM rank (the last) included."""
    return (400, 300, 350, 450)[rank]


class Memory(Equal):
    """Every rank has memory for passes of another size (`memory_positions`): each replica plans for its
    smallest."""

    def memory(self, model) -> int:
        import torch.distributed as dist

        from megatron_eval_hook.engine.memory import RESERVED, Footprint

        return RESERVED + 2 * Footprint.of(model, 64).position * memory_positions(dist.get_rank())


CASES = {
    "equal": Equal(),
    "gathered": Gathered(),
    "faults": Faults(),
    "build_fails": BuildFails(),
    "memory": Memory(),
}
