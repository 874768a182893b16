"""CLIP (Radford et al., 2021): ModifiedResNet or ViT image tower, causal text transformer, projections.

Faithful to OpenAI's ``clip/model.py`` so that OpenAI archives and OpenCLIP state dicts of the OpenAI
architectures load with strict key and shape checks: every module attribute is named after its checkpoint key
(``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final.weight``, ``text_projection``, ``logit_scale``).

Conventions: images are float32 ``[N, 3, S, S]`` already resized (short side to S, bicubic, antialiased as
PIL does), center-cropped and normalized with ``config.mean``/``config.std``; texts are int64 token ids
``[N, L]`` (L <= context_length) that start with ``<start_of_text>`` and end with ``<end_of_text>`` (the
largest id of the vocabulary) followed by zero padding. Features are returned unnormalized, like OpenAI's
``encode_image`` / ``encode_text``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipConfig:
    """Shapes of one CLIP variant plus the preprocessing its weights expect.

    ``vision_layers`` is an int (ViT depth) or a 4-tuple (ModifiedResNet blocks per stage);
    ``vision_patch_size`` is None for ModifiedResNet. Heads are width / 64 as in OpenAI's ``build_model``.
    Preprocessing: resize the short side to ``image_size`` (bicubic, antialiased like PIL), center crop
    ``image_size`` x ``image_size``, scale to [0, 1], normalize with ``mean``/``std`` (RGB order).
    """

    embed_dim: int
    image_size: int
    vision_layers: int | tuple[int, int, int, int]
    vision_width: int
    vision_patch_size: int | None
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    quick_gelu: bool = True  # OpenAI's weights were trained with QuickGELU; most OpenCLIP ones with GELU
    head_width: int = 64
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # short side to image_size, then center crop

    @property
    def is_vit(self) -> bool:
        return not isinstance(self.vision_layers, tuple)

    @property
    def vision_heads(self) -> int:
        # The ResNet's attention pool works on width * 32 channels.
        return (self.vision_width if self.is_vit else self.vision_width * 32) // self.head_width


CLIP_CONFIGS: dict[str, ClipConfig] = {
    "RN50": ClipConfig(1024, 224, (3, 4, 6, 3), 64, None),
    "RN101": ClipConfig(512, 224, (3, 4, 23, 3), 64, None),
    "RN50x4": ClipConfig(640, 288, (4, 6, 10, 6), 80, None, text_width=640, text_heads=10),
    "ViT-B/32": ClipConfig(512, 224, 12, 768, 32),
    "ViT-B/16": ClipConfig(512, 224, 12, 768, 16),
    "ViT-L/14": ClipConfig(768, 224, 24, 1024, 14, text_width=768, text_heads=12),
    "ViT-L/14@336": ClipConfig(768, 336, 24, 1024, 14, text_width=768, text_heads=12),
    # Small variants for tests and demos: the real vocabulary and context, 2 heads per tower.
    "tiny-vit": ClipConfig(64, 224, 2, 128, 32, text_width=128, text_heads=2, text_layers=2),
    "tiny-rn": ClipConfig(64, 64, (1, 1, 1, 1), 8, None, text_width=128, text_heads=2, text_layers=2),
}


def config_from_state_dict(sd: Mapping[str, torch.Tensor], quick_gelu: bool = True) -> ClipConfig:
    """Infer the variant from a flat OpenAI-style state dict's shapes, as OpenAI's ``build_model`` does.

    Raises ``KeyError`` naming the first key a CLIP state dict must have and this one lacks.
    """
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                "visual.conv1.weight"):
        if key not in sd:
            raise KeyError(key)
    if "visual.proj" in sd:
        patch_size = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(
            vision_layers=_count(sd, "visual.transformer.resblocks."),
            vision_width=sd["visual.conv1.weight"].shape[0], vision_patch_size=patch_size,
            image_size=patch_size * grid,
        )
    else:
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(
            vision_layers=tuple(_count(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4)),
            vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None,
            image_size=grid * 32,
        )
    text_width = sd["ln_final.weight"].shape[0]
    return ClipConfig(
        embed_dim=sd["text_projection"].shape[1], context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0], text_width=text_width, text_heads=text_width // 64,
        text_layers=_count(sd, "transformer.resblocks."), quick_gelu=quick_gelu, **vision,
    )


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct block indices ``prefix<i>.`` among the keys."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (keeps fp16 exports stable), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride is an average pool after conv2 (antialiased downsampling)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # key names "downsample.0" / "downsample.1" as in the checkpoints; the pool ("-1") has no weights
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling: the mean of the grid queries all grid positions (plus itself)."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        x = x.flatten(2).transpose(1, 2)  # NCHW -> N(HW)C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # N(HW+1)C
        x = x + self.positional_embedding.to(x.dtype)
        # OpenAI attends with every position as a query but keeps only output 0, so one query suffices.
        q = self.q_proj(x[:, :1]).view(n, 1, self.num_heads, -1).transpose(1, 2)  # N h 1 d
        k = self.k_proj(x).view(n, -1, self.num_heads, c // self.num_heads).transpose(1, 2)  # N h L d
        v = self.v_proj(x).view(n, -1, self.num_heads, c // self.num_heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # N h 1 d
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem + avgpool, antialiased strided blocks and attention pooling."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int,
                 width: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width  # grows while the stages are built
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)  # N, width, S/4, S/4
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # N, 32*width, S/32, S/32
        return self.attnpool(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_head: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on batch-first ``[N, L, D]`` sequences."""

    def __init__(self, width: int, layers: int, heads: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        blocks = [ResidualAttentionBlock(width, heads, act_layer) for _ in range(layers)]
        self.resblocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """ViT: patchify conv, class token, learned positions, pre-LN, transformer, LN of class token, proj."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = input_resolution // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.to(self.conv1.weight.dtype))  # N, width, grid, grid
        x = x.flatten(2).transpose(1, 2)  # N, grid**2, width
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # N, grid**2 + 1, width
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    """Image tower ``visual`` + causal text transformer at the root, as in OpenAI's state dicts."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        act_layer = QuickGELU if config.quick_gelu else nn.GELU
        if config.is_vit:
            self.visual = VisionTransformer(
                input_resolution=config.image_size, patch_size=config.vision_patch_size,
                width=config.vision_width, layers=config.vision_layers, heads=config.vision_heads,
                output_dim=config.embed_dim, act_layer=act_layer,
            )
        else:
            self.visual = ModifiedResNet(
                layers=config.vision_layers, output_dim=config.embed_dim, heads=config.vision_heads,
                input_resolution=config.image_size, width=config.vision_width,
            )
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads, act_layer)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        # Additive causal mask; not a checkpoint key. Sliced to the batch's token length in encode_text.
        mask = torch.full((config.context_length, config.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialization, so a model without loaded weights is still well defined."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` normalized pixels -> ``[N, embed_dim]`` unnormalized image features."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` int64 token ids (L <= context_length) -> ``[N, embed_dim]`` unnormalized features.

        Under the causal mask, the feature at the end-of-text token does not depend on the positions after
        it, so any L that keeps every sequence's end token gives the same features as L = 77.
        """
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length].to(self.dtype)  # N, L, D
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        return self.pool_eot(x, text) @ self.text_projection

    @staticmethod
    def pool_eot(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Features at the end-of-text token, the largest id of each row (OpenAI's and open_clip's "argmax").

        Written for export: ids (< 2**24) are exact in float32, and a float ArgMax + Gather is accepted by
        ONNX Runtime and TensorRT alike, where an ArgMax over int64 is not. Ties resolve to the first index
        in torch and in ONNX (``select_last_index=0``).
        """
        eot = text.to(torch.float32).argmax(dim=-1)  # N
        # repeat (Tile with constant counts) and flatten rather than expand(-1, ...) and squeeze(1): exported,
        # those computed the target shape per call and wrapped the squeeze in an If node (a control-flow node,
        # which ONNX Runtime refuses to capture in a CUDA graph).
        index = eot.view(-1, 1, 1).repeat(1, 1, x.shape[-1])
        return x.gather(1, index).flatten(1)  # N, D

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img])`` like OpenAI."""
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_clip(config: ClipConfig) -> CLIP:
    """A CLIP model in eval mode with OpenAI's initialization (load weights with ``load_clip``)."""
    return CLIP(config).eval()
