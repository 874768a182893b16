"""The DALL·E transformer prior: a decoder-only transformer over [text tokens | image tokens].

Sequence convention (T = ``text_len``, N = ``image_grid²`` image tokens, row-major over the grid):

- input position ``p`` holds text token ``t_p`` for ``p < T`` and image token ``i_{p-T}`` for ``p >= T``; the
  output at ``p`` predicts the token at ``p + 1``. So outputs ``0..T-2`` predict text, output ``T-1``
  predicts ``i_0`` and output ``T+j`` predicts ``i_{j+1}``. The last image token is never fed, hence the
  context (and KV cache) length ``context_len = T + N - 1``.
- text ids are padded *by the caller* to exactly ``text_len`` with ``config.pad_id`` (= ``text_vocab - 1``,
  one past the tokenizer's ids). As in the paper, a padded slot gets a padding embedding learned separately
  for each text position instead of a shared token embedding.
- image tokens get an image-token embedding plus a row and a column embedding of their grid cell; text
  tokens a text embedding plus a learned position.
- one output head covers text + image vocabularies; text positions use its first ``text_vocab`` logits,
  image positions only its last ``image_vocab`` (image logits are restricted to image codes).
- each layer's image→image attention is "dense" (causal), or one of the paper's sparse masks: "row",
  "column", "conv" (see :func:`attention_mask`). Text→text is always causal; image queries always see all
  text.

Loss (paper): cross-entropy on text predictions weighted 1/8, on image predictions 7/8, each averaged over
its own positions (padding targets included). Incremental decoding: :meth:`DallePrior.prefill` and
:meth:`DallePrior.step` with fixed-size cache buffers ``[n_layers, B, n_heads, context_len, head_dim]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from edgefm.models.checkpoint import load_strict, read_state_dict
from edgefm.runtime.errors import InputError
from torch import nn

from .prior_config import (  # noqa: F401  (re-exported: the sizes belong with the model to users)
    ATTENTION_PATTERNS,
    CLIP_TEXT_VOCAB,
    PRIOR_CONFIGS,
    PriorConfig,
    attention_mask,
    paper_attention,
    resolve_prior_config,
)

TEXT_LOSS_WEIGHT = 1 / 8
IMAGE_LOSS_WEIGHT = 7 / 8


class Attention(nn.Module):
    """Multi-head self-attention whose mask is given by the caller (one mask for all heads)."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.attn_dropout = nn.Dropout(config.dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, D] -> q, k, v each [B, H, S, D/H]."""
        # Length and widths as Python ints, the batch as -1: an exported graph (prefill: S = text_len, step:
        # S = 1) then reshapes by constants instead of computing each shape from Shape ops per call.
        s, d = int(x.shape[1]), int(x.shape[2])
        qkv = self.qkv(x).reshape(-1, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, S, d], k/v [B, H, L, d], mask bool [S, L] -> [B, S, H*d] (before ``proj``)."""
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        # Every row keeps at least its own position, so -inf never yields an all-masked softmax.
        scores = scores.masked_fill(~mask, float("-inf"))
        y = self.attn_dropout(scores.softmax(dim=-1)) @ v
        h, s, d = (int(n) for n in y.shape[1:])  # constants in an exported graph, as in project
        return y.transpose(1, 2).reshape(-1, s, h * d)


class MLP(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, D], mask [S, S] -> (x, k, v) with k, v [B, H, S, D/H] for a cache."""
        q, k, v = self.attn.project(self.ln_1(x))
        return self.residual(x, self.attn.attend(q, k, v, mask)), k, v

    def residual(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The block after its attention: x + proj(attended), then x + mlp(ln_2(x)); ``attended`` [B, S, D] is
        the heads' output before the projection."""
        x = x + self.resid_dropout(self.attn.proj(attended))
        return x + self.resid_dropout(self.mlp(self.ln_2(x)))

    def step(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
        mask_row: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position: x [B, 1, D], caches [B, H, L, d], slot bool [L] (one-hot of the position),
        mask_row bool [1, L]. Returns x and the caches with this position written."""
        q, k, v = self.attn.project(self.ln_1(x))
        # A select against a one-hot slot writes the cache without data-dependent shapes (exports as Where).
        k_cache = torch.where(slot[:, None], k, k_cache)
        v_cache = torch.where(slot[:, None], v, v_cache)
        return self.residual(x, self.attn.attend(q, k_cache, v_cache, mask_row)), k_cache, v_cache

    def step_inplace(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: int,
                     mask_row: torch.Tensor) -> torch.Tensor:
        """As :meth:`step`, written the way eager PyTorch decodes fastest: this position's key and value go
        into the caches in place and attention reads positions ``0..position`` only (``mask_row`` bool
        [1, position + 1]). Returns x."""
        q, k, v = self.attn.project(self.ln_1(x))
        k_cache[:, :, position] = k[:, :, 0]
        v_cache[:, :, position] = v[:, :, 0]
        n = position + 1
        p = self.attn.attn_dropout.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask_row, dropout_p=p)
        return self.residual(x, y.transpose(1, 2).reshape(x.shape[0], 1, -1))


class DallePrior(nn.Module):
    """Decoder-only transformer over [text | image] tokens; see the module docstring for conventions."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = c = config
        self.text_embedding = nn.Embedding(c.text_vocab, c.d_model)
        self.text_pad_embedding = nn.Parameter(torch.zeros(c.text_len, c.d_model))
        self.text_position = nn.Parameter(torch.zeros(c.text_len, c.d_model))
        self.image_embedding = nn.Embedding(c.image_vocab, c.d_model)
        self.image_row = nn.Parameter(torch.zeros(c.image_grid, c.d_model))
        self.image_column = nn.Parameter(torch.zeros(c.image_grid, c.d_model))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.to_logits = nn.Linear(c.d_model, c.text_vocab + c.image_vocab)
        self.embed_dropout = nn.Dropout(c.dropout)
        for pattern in sorted(set(c.layer_patterns)):
            self.register_buffer(f"mask_{pattern}", attention_mask(c, pattern), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, DallePrior):
            for p in (module.text_pad_embedding, module.text_position, module.image_row, module.image_column):
                nn.init.normal_(p, std=0.02)

    # ---- embeddings -------------------------------------------------------------------------------
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, T] (padded with ``pad_id``) -> [B, T, D]."""
        c = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] != c.text_len:
            raise InputError(
                f"text_ids must have shape [batch, {c.text_len}] (padded with id {c.pad_id}); "
                f"got {tuple(text_ids.shape)}. Truncate or pad the tokens to text_len first."
            )
        tokens = self.text_embedding(text_ids)
        tokens = torch.where((text_ids == c.pad_id)[..., None], self.text_pad_embedding, tokens)
        return tokens + self.text_position

    def image_position(self, index: torch.Tensor) -> torch.Tensor:
        """Row + column embedding of grid index ``index`` (any shape of int64) -> [..., D]."""
        # Indices are >= 0, where truncating division is floor division: one integer Div when exported, where
        # rounding_mode="floor" adds the sign corrections (Mod, Less, Xor, And, Where).
        row = index.div(self.config.image_grid, rounding_mode="trunc")
        col = index - row * self.config.image_grid
        return self.image_row[row] + self.image_column[col]

    def hidden(self, text_ids: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LN hidden states [B, T + n, D] of text ids [B, T] followed by image ids [B, n], n < N."""
        x = self.embed_text(text_ids)
        if image_ids is not None and image_ids.shape[1] > 0:
            n = image_ids.shape[1]
            if n >= self.config.image_len:
                raise InputError(f"at most {self.config.image_len - 1} image tokens can be fed, got {n}")
            index = torch.arange(n, device=image_ids.device)
            x = torch.cat([x, self.image_embedding(image_ids) + self.image_position(index)], dim=1)
        x = self.embed_dropout(x)
        s = x.shape[1]
        for block, pattern in zip(self.blocks, self.config.layer_patterns, strict=True):
            x, _, _ = block(x, getattr(self, f"mask_{pattern}")[:s, :s])
        return self.ln_f(x)

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        v = self.config.text_vocab
        return F.linear(h, self.to_logits.weight[:v], self.to_logits.bias[:v])

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        v = self.config.text_vocab
        return F.linear(h, self.to_logits.weight[v:], self.to_logits.bias[v:])

    def forward(
        self, text_ids: torch.Tensor, image_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (text logits [B, T-1, text_vocab] predicting t_1..t_{T-1},
        image logits [B, n+1, image_vocab] predicting i_0..i_n) for n fed image tokens."""
        h = self.hidden(text_ids, image_ids)
        t = self.config.text_len
        return self.text_logits(h[:, : t - 1]), self.image_logits(h[:, t - 1 :])

    def training_loss(
        self, text_ids: torch.Tensor, image_ids: torch.Tensor, text_vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Paper loss: 1/8 · CE(text) + 7/8 · CE(image) of :meth:`loss_parts`."""
        text_loss, image_loss = self.loss_parts(text_ids, image_ids, text_vocab)
        return TEXT_LOSS_WEIGHT * text_loss + IMAGE_LOSS_WEIGHT * image_loss

    def loss_parts(
        self, text_ids: torch.Tensor, image_ids: torch.Tensor, text_vocab: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropies ``(text, image)``; ``image_ids`` int64 [B, N] (all grid codes).

        ``text_vocab`` (sorted int64 ids that hold every text target) restricts the text softmax to those
        rows of the head. A small training world uses a few dozen of the tokenizer's 49,409 ids; the others
        are never a target, and the full softmax would only keep pushing their logits down at the cost of
        most of a step (the image loss and the sampled image tokens do not depend on them)."""
        h = self.hidden(text_ids, image_ids[:, :-1])
        t = self.config.text_len
        targets = text_ids[:, 1:].flatten()
        if text_vocab is None:
            text_logits = self.text_logits(h[:, : t - 1])
        else:
            text_logits = F.linear(h[:, : t - 1], self.to_logits.weight[text_vocab], self.to_logits.bias[text_vocab])
            targets = torch.searchsorted(text_vocab, targets)
        text_loss = F.cross_entropy(text_logits.flatten(0, 1), targets)
        image_loss = F.cross_entropy(self.image_logits(h[:, t - 1 :]).flatten(0, 1), image_ids.flatten())
        return text_loss, image_loss

    # ---- incremental decoding -------------------------------------------------------------------------
    def prefill(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """text ids [B, T] -> (logits of i_0 [B, image_vocab], k_cache, v_cache).

        Caches are ``[n_layers, B, n_heads, context_len, head_dim]`` with positions ``0..T-1`` written and
        zeros elsewhere; their size never changes, so a runtime can keep them in place on a device.
        """
        c = self.config
        x = self.embed_dropout(self.embed_text(text_ids))
        ks, vs = [], []
        for block, pattern in zip(self.blocks, c.layer_patterns, strict=True):
            x, k, v = block(x, getattr(self, f"mask_{pattern}")[: c.text_len, : c.text_len])
            ks.append(k)
            vs.append(v)
        k, v = torch.stack(ks), torch.stack(vs)  # [n_layers, B, H, T, head_dim]
        # Concatenating zeros (rather than F.pad) keeps the graph to ops every exporter maps at opset 17.
        empty = k.new_zeros(k.shape[0], k.shape[1], k.shape[2], c.context_len - c.text_len, k.shape[4])
        k_cache, v_cache = torch.cat([k, empty], dim=3), torch.cat([v, empty], dim=3)
        return self.image_logits(self.ln_f(x[:, -1])), k_cache, v_cache

    def step_input(self, token: torch.Tensor, position: torch.Tensor | int) -> torch.Tensor:
        """Image token ``token`` (int64 [B]) embedded for sequence ``position`` (int, or an int64 scalar):
        its embedding plus its grid cell's, [B, 1, D]."""
        if not isinstance(position, torch.Tensor):  # (a tensor is used as it is: no Cast in an exported graph)
            position = torch.tensor(position, dtype=torch.long, device=token.device)
        index = position - self.config.text_len
        return self.embed_dropout((self.image_embedding(token) + self.image_position(index))[:, None])

    def step(
        self, token: torch.Tensor, position: torch.Tensor | int, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed image token ``token`` (int64 [B]) at sequence ``position`` (int64 scalar, T <= position <
        context_len; image token j sits at T + j) -> (logits of the next image token [B, image_vocab],
        updated k_cache, updated v_cache)."""
        c = self.config
        position = torch.as_tensor(position, dtype=torch.long, device=token.device)
        x = self.step_input(token, position)
        slot = torch.arange(c.context_len, device=token.device) == position
        # This position's mask row, once per attention pattern rather than once per layer.
        rows = {p: getattr(self, f"mask_{p}")[position][None] for p in dict.fromkeys(c.layer_patterns)}
        new_k, new_v = [], []
        for i, (block, pattern) in enumerate(zip(self.blocks, c.layer_patterns, strict=True)):
            x, k, v = block.step(x, k_cache[i], v_cache[i], slot, rows[pattern])
            new_k.append(k)
            new_v.append(v)
        return self.image_logits(self.ln_f(x[:, 0])), torch.stack(new_k), torch.stack(new_v)

    def step_inplace(self, token: torch.Tensor, position: int, k_cache: torch.Tensor, v_cache: torch.Tensor
                     ) -> torch.Tensor:
        """Eager decoding's step: :meth:`step`'s logits, with ``k_cache``/``v_cache`` (as :meth:`prefill`
        returns them) updated in place, attending over the positions written so far. :meth:`step` is the
        form that exports (fixed shapes, caches in and out); this one is what :meth:`generate` runs, so that
        PyTorch timings against the exported step compare with PyTorch at its best."""
        c = self.config
        if not c.text_len <= position < c.context_len:
            raise ValueError(f"position {position} is outside the image positions [{c.text_len}, {c.context_len})")
        x = self.step_input(token, position)
        rows = {p: getattr(self, f"mask_{p}")[position, : position + 1][None] for p in dict.fromkeys(c.layer_patterns)}
        for i, (block, pattern) in enumerate(zip(self.blocks, c.layer_patterns, strict=True)):
            x = block.step_inplace(x, k_cache[i], v_cache[i], position, rows[pattern])
        return self.image_logits(self.ln_f(x[:, 0]))

    @torch.no_grad()
    def generate(
        self,
        text_ids: torch.Tensor,
        *,
        use_cache: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        guidance: float = 1.0,
        empty_text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image codes int64 [B, N] for text ids [B, T]; ``use_cache=False`` recomputes the whole
        sequence for every token (the naive reference the KV cache is measured against).

        ``guidance`` != 1: classifier-free guidance against ``empty_text_ids`` ([T], the empty caption), each
        token drawn from ``u + guidance · (c - u)`` of the conditional and unconditional image logits."""
        c = self.config
        b = text_ids.shape[0]
        if guidance != 1:
            if empty_text_ids is None:
                raise ValueError("guidance != 1 needs empty_text_ids (the framed empty caption)")
            text_ids = torch.cat([text_ids, empty_text_ids.expand(b, -1)])
        image = text_ids.new_zeros(text_ids.shape[0], 0)
        k_cache = v_cache = None
        for j in range(c.image_len):
            if not use_cache:
                logits = self.image_logits(self.hidden(text_ids, image)[:, -1])
            elif j == 0:
                logits, k_cache, v_cache = self.prefill(text_ids)
            else:
                logits = self.step_inplace(image[:, -1], c.text_len + j - 1, k_cache, v_cache)
            if guidance != 1:
                logits = logits[b:] + guidance * (logits[:b] - logits[b:])
            token = _choose(logits, temperature, top_k, greedy, generator)
            if guidance != 1:
                token = torch.cat([token, token])
            image = torch.cat([image, token[:, None]], dim=1)
        return image[:b]


def _choose(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def train_step(
    model: DallePrior, optimizer: torch.optim.Optimizer, text_ids: torch.Tensor, image_ids: torch.Tensor,
    text_vocab: torch.Tensor | None = None,
) -> float:
    """One optimisation step on the paper loss; returns the loss before the update."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model.training_loss(text_ids, image_ids, text_vocab)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def build_prior(name_or_config: str | PriorConfig = "tiny") -> DallePrior:
    """A randomly initialised prior of a named size (``PRIOR_CONFIGS``) or an explicit config."""
    if isinstance(name_or_config, PriorConfig):
        return DallePrior(name_or_config)
    if name_or_config not in PRIOR_CONFIGS:
        raise ValueError(f"unknown prior size {name_or_config!r}; known: {', '.join(PRIOR_CONFIGS)}")
    return DallePrior(PRIOR_CONFIGS[name_or_config])


def load_prior(path: str | Path, config: str | PriorConfig | Path | None = None) -> tuple[str, DallePrior]:
    """A prior from a state-dict checkpoint, loaded with strict key and shape checks."""
    path = Path(path)
    name, cfg = resolve_prior_config(config, path)
    prior = DallePrior(cfg)
    load_strict(prior, read_state_dict(path), str(path), model_name=f"the DALL·E prior {name!r}")
    return name, prior.eval()
