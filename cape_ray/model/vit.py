"""`--model vit`: a timm ViT backbone with a keypoint decoder in the style of Pose Anything and
CapeFormer.

    images -> ViT patch tokens (final norm) -> 1x1 projection -> unit-norm features [N, D, h, w]
    support keypoint tokens: the support features sampled at the keypoints (bilinear), mean over shots
    proposals: cosine similarity of each token with every query cell -> soft-argmax in a 3x3 window
    decoder layers, each: self-attention among the keypoints (+ the skeleton as a graph prior),
        cross-attention to the query's patch tokens, a feed-forward block, and a coordinate delta in
        inverse-sigmoid space; coordinates are detached between layers and every layer is supervised

Backbone. Any timm `VisionTransformer` (DINOv2 ViT-S/14 by default, EdgeCape's choice) built at the
data pipeline's crop size: the size must be a multiple of the patch size (224 = 16 x 14). Images are
normalised with the backbone's own mean and std. `freeze_backbone` trains none of it and runs it
without autograd; `train_backbone_blocks N` trains only the last N blocks and the final norm, and
runs the frozen blocks before them without autograd (no activations kept for them).
`set_grad_checkpointing` recomputes the trained blocks' activations in the backward pass.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cape_ray.model.api import CapeModelBase, LoadReport, ModelError, Prediction, load_matching
from cape_ray.model.layers import (
    CoordinateEmbedding,
    KeypointSelfAttention,
    SkeletonGraphConv,
    cell_centres,
    inverse_sigmoid,
    local_soft_argmax,
    support_tokens,
)

DEFAULT_BACKBONE = "vit_small_patch14_dinov2"


class ViTBackbone(nn.Module):
    """A timm VisionTransformer returning its patch tokens as a feature map [N, C, h, w]."""

    def __init__(self, name: str, image_size: int, freeze: bool = False, train_blocks: Optional[int] = None,
                 backbone_args: Optional[dict] = None):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        args = dict(backbone_args or {})
        if "img_size" in args and args["img_size"] != image_size:
            raise ModelError(f"--backbone {name}: img_size {args['img_size']} in --model_kwargs differs from "
                             f"--image_size {image_size}, the size the data pipeline crops to; set --image_size")
        args.pop("img_size", None)
        try:
            # img_size always: DINOv2 entries otherwise default to 518 px (a 37 x 37 grid)
            self.vit = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0, **args)
        except RuntimeError as exc:  # timm: unknown model
            raise ModelError(f"--backbone {name!r}: {str(exc).splitlines()[0]} (timm.list_models('vit_*') lists "
                             f"the ViT names)") from None
        except (TypeError, AssertionError, ValueError) as exc:
            raise ModelError(f"--backbone {name}: cannot build it at {image_size} px with {args}: {exc}") from None
        if not isinstance(self.vit, VisionTransformer):
            raise ModelError(f"--backbone {name!r} is a timm {type(self.vit).__name__}, not a VisionTransformer; "
                             f"--model vit takes ViT backbones (vit_*, deit_*, *_dinov2)")
        patch = self.vit.patch_embed.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        if image_size % patch:
            lower, upper = image_size // patch * patch, (image_size // patch + 1) * patch
            raise ModelError(f"--image_size {image_size} is not a multiple of {name}'s patch size {patch}: the "
                             f"crop must tile into patches; use --image_size {lower or upper} or {upper}")
        self.patch = patch
        self.grid = tuple(self.vit.patch_embed.grid_size)
        self.out_dim = self.vit.num_features
        self.num_prefix = self.vit.num_prefix_tokens
        config = self.vit.pretrained_cfg or {}
        self.register_buffer("mean", torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1),
                             persistent=False)
        blocks = len(self.vit.blocks)
        if train_blocks is not None and train_blocks > blocks:
            raise ModelError(f"--train_backbone_blocks {train_blocks}: {name} has only {blocks} blocks")
        # blocks[:first_trained] are frozen and run without autograd; None trains everything
        self.first_trained = blocks if freeze else (blocks - train_blocks if train_blocks is not None else 0)
        self.frozen = freeze
        if freeze:
            self.vit.requires_grad_(False)
        elif self.first_trained > 0:
            for part in (self.vit.patch_embed, self.vit.norm_pre, *self.vit.blocks[:self.first_trained]):
                part.requires_grad_(False)
            for parameter in (self.vit.cls_token, self.vit.reg_token, self.vit.pos_embed):
                if parameter is not None:
                    parameter.requires_grad_(False)
        self.grad_checkpointing = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.first_trained == 0):
            x = vit.patch_embed((images - self.mean) / self.std)
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
            for block in vit.blocks[:self.first_trained]:
                x = block(x)
        for block in vit.blocks[self.first_trained:]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = vit.norm(x)
        tokens = x[:, self.num_prefix:]
        return tokens.transpose(1, 2).unflatten(2, self.grid)


class CrossAttention(nn.Module):
    """Keypoint tokens [N, K, D] attend to image tokens [N, T, D] (keys carry the cells' positions)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        n, k, dim = queries.shape
        head_dim = dim // self.heads

        def heads(x: torch.Tensor) -> torch.Tensor:  # [N, L, D] -> [N, H, L, D/H]
            return x.view(n, -1, self.heads, head_dim).transpose(1, 2)

        # Written out rather than F.scaled_dot_product_attention: its fused CUDA backward kernels are
        # not deterministic, and cape-ray's GPU resumes are bitwise.
        scores = heads(self.q(queries)) @ heads(self.k(keys)).transpose(-2, -1) / math.sqrt(head_dim)
        attended = self.dropout(scores.softmax(dim=-1)) @ heads(self.v(values))
        return self.out(attended.transpose(1, 2).reshape(n, k, dim))


class DecoderLayer(nn.Module):
    """Self-attention among keypoints (+ skeleton graph), cross-attention to the query image, FFN,
    then a coordinate delta in inverse-sigmoid space (CapeFormer's refinement)."""

    def __init__(self, dim: int, heads: int, dropout: float, use_skeleton: bool, ffn_mult: int = 3):
        super().__init__()
        self.position = CoordinateEmbedding(dim)
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = KeypointSelfAttention(dim, heads, dropout)
        self.graph_norm = nn.LayerNorm(dim) if use_skeleton else None
        self.graph = SkeletonGraphConv(dim) if use_skeleton else None
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim),
                                 nn.Dropout(dropout))
        self.delta_norm = nn.LayerNorm(dim)
        self.delta = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))
        nn.init.zeros_(self.delta[-1].weight)  # start as the identity: a layer can only refine
        nn.init.zeros_(self.delta[-1].bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens, coords, image_tokens, image_keys, key_mask, adjacency):
        """tokens [N, K, D]; coords [N, K, 2] (detached); image_tokens / image_keys [N, T, D]
        (keys = tokens + cell positions) -> (tokens, refined coords)."""
        position = self.position(coords)
        h = tokens + self.dropout(self.self_attn(self.self_norm(tokens) + position, key_mask))
        if self.graph is not None:
            h = h + self.dropout(self.graph(self.graph_norm(h), adjacency, key_mask))
        h = h + self.dropout(self.cross_attn(self.cross_norm(h) + position, image_keys, image_tokens))
        h = h + self.ffn(self.ffn_norm(h))
        return h, torch.sigmoid(inverse_sigmoid(coords) + self.delta(self.delta_norm(h)))


class VitCape(CapeModelBase):
    def __init__(self, backbone: str = DEFAULT_BACKBONE, image_size: int = 224, decoder_dim: int = 256,
                 decoder_layers: int = 3, heads: int = 8, use_skeleton: bool = True, dropout: float = 0.1,
                 freeze_backbone: bool = False, train_backbone_blocks: Optional[int] = None,
                 proposal_radius: int = 1, backbone_args: Optional[dict] = None):
        super().__init__()
        if decoder_dim % heads:
            raise ModelError(f"--feature_dim {decoder_dim} (the decoder's width) must be a multiple of its "
                             f"{heads} attention heads")
        self.backbone = ViTBackbone(backbone, image_size, freeze_backbone, train_backbone_blocks, backbone_args)
        self.input_proj = nn.Linear(self.backbone.out_dim, decoder_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))  # cosine-similarity temperature
        self.proposal_radius = proposal_radius
        self.token_proj = nn.Linear(decoder_dim, decoder_dim)
        self.support_position = CoordinateEmbedding(decoder_dim)
        self.image_position = CoordinateEmbedding(decoder_dim)
        self.layers = nn.ModuleList(DecoderLayer(decoder_dim, heads, dropout, use_skeleton)
                                    for _ in range(decoder_layers))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()),
                "head": [p for n, p in self.named_parameters() if not n.startswith("backbone.")]}

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.backbone.grad_checkpointing = bool(enabled)

    def load_pretrained(self, state_dict: dict[str, torch.Tensor], source: str = "") -> LoadReport:
        """Backbone weights in timm's layout (or Meta's original DINOv2 keys), with the position
        embedding resampled to this grid; a shape that still differs names the key and both shapes."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        vit = self.backbone.vit
        return load_matching(vit, checkpoint_filter_fn(dict(state_dict), vit), source)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] -> unit-norm projected patch features [N, D, H/p, W/p]."""
        tokens = self.backbone(images)  # [N, C, h, w]
        projected = self.input_proj(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.normalize(projected, dim=1)

    def decode(self, support_features, support_keypoints, support_visible, query_features, keypoint_mask,
               skeleton) -> Prediction:
        batch, queries, num_keypoints = support_features.shape[0], query_features.shape[1], support_keypoints.shape[2]
        height, width = query_features.shape[-2:]
        token_features, support_position = support_tokens(support_features, support_keypoints, support_visible)
        unit_tokens = F.normalize(token_features, dim=-1)
        logits = self.scale * torch.einsum("bkd,bqdhw->bqkhw", unit_tokens, query_features)
        proposal = local_soft_argmax(logits, self.proposal_radius)  # [B, Q, K, 2]
        stages = [proposal]
        if self.layers:
            def per_pair(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B*Q, ...]
                return x.unsqueeze(1).expand(batch, queries, *x.shape[1:]).flatten(0, 1)

            tokens = per_pair(self.token_proj(token_features) + self.support_position(support_position))
            key_mask, adjacency = per_pair(keypoint_mask), per_pair(skeleton.to(tokens.dtype))
            image_tokens = query_features.flatten(0, 1).flatten(2).transpose(1, 2)  # [B*Q, h*w, D]
            cells = cell_centres(height, width, device=image_tokens.device, dtype=image_tokens.dtype)
            image_keys = image_tokens + self.image_position(cells)
            coords = proposal.flatten(0, 1)
            for layer in self.layers:
                tokens, coords = layer(tokens, coords.detach(), image_tokens, image_keys, key_mask, adjacency)
                stages.append(coords.view(batch, queries, num_keypoints, 2))
        return Prediction(torch.stack(stages), logits)


def build_vit(backbone: str = DEFAULT_BACKBONE, image_size: int = 224, feature_dim: int = 256,
              refine_layers: int = 3, use_skeleton: bool = True, dropout: float = 0.1, freeze_backbone: bool = False,
              train_backbone_blocks: Optional[int] = None, **extra: Any) -> VitCape:
    """`--model vit` from the config's flags (`extra`: --model_kwargs: heads, proposal_radius,
    backbone_args such as {"depth": 2, "embed_dim": 48, "num_heads": 2} for a tiny ViT)."""
    return VitCape(backbone=backbone, image_size=image_size, decoder_dim=feature_dim, decoder_layers=refine_layers,
                   use_skeleton=use_skeleton, dropout=dropout, freeze_backbone=freeze_backbone,
                   train_backbone_blocks=train_backbone_blocks, **extra)
