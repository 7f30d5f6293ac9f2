"""SG-Former: created by name at the published sizes, the reference design's output at 224 px, the same weights at
other sizes, timm's conventions (classifier, weight decay, layer groups, gradient checkpointing), and one graph
for torch.compile."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from slurmvision.configs import ModelConfig, load_config
from slurmvision.models import build_model
from slurmvision.models.sgformer.attention import Attention, HybridScaleAttention, SignificanceGuidedAttention

pytestmark = pytest.mark.unit

# The reference's merge widths r of f1, f2, f3 per sr, and its group bounds (fractions of the sorted tokens).
REFERENCE_MERGES = {8: (196, 56, 28), 4: (49, 14, 7), 2: (2, 1)}
REFERENCE_BOUNDS = {8: (0, 1 / 4, 3 / 4, 1), 4: (0, 1 / 4, 3 / 4, 1), 2: (0, 1 / 2, 1)}


# A straight implementation of the reference design's attention, written apart from the model and loading its
# weights. At 224 px the windows tile the maps and the groups hold whole chunks, as in the reference; at other
# sizes it states our generalisation plainly: a border window holds only the tokens inside the map, and the last
# chunk of a group may be short (its merge sums the tokens it has).


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, C = t.shape
    return t.reshape(B, L, heads, C // heads).permute(0, 2, 1, 3)


def _keys_values(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, C = t.shape
    return t.reshape(B, L, 2, heads, C // 2 // heads).permute(2, 0, 3, 1, 4)


def _softmax_attention(q, k, v, scale):
    attn = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return (attn @ v).permute(0, 2, 1, 3).flatten(2), attn


def _project(attn, out, x, H, W):
    B, N, C = x.shape
    lepe = attn.lepe_conv(attn.lepe_linear(x).transpose(1, 2).reshape(B, C, H, W)).reshape(B, C, N).transpose(1, 2)
    return attn.proj(out + lepe)


def reference_hybrid(attn, x, H, W):
    B, N, C = x.shape
    heads, s = attn.num_heads // 2, attn.sr_ratio
    reduced = attn.act(attn.norm(attn.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)))
    k, v = _keys_values(attn.kv1(reduced), heads)
    wide, a = _softmax_attention(_split(attn.q1(x), heads), k, v, attn.scale)
    significance = F.interpolate(a.mean(dim=(1, 2)).reshape(B, 1, H // s, W // s), size=(H, W), mode="nearest")
    significance = significance.reshape(B, N)
    queries, keys_values = attn.q2(x).reshape(B, H, W, -1), attn.kv2(x).reshape(B, H, W, -1)
    local, local_significance = x.new_zeros(B, H, W, C // 2), x.new_zeros(B, H, W)
    for i in range(0, H, 7):
        for j in range(0, W, 7):
            q = queries[:, i : i + 7, j : j + 7]
            rows, cols = q.shape[1:3]
            k, v = _keys_values(keys_values[:, i : i + 7, j : j + 7].reshape(B, rows * cols, -1), heads)
            out, a = _softmax_attention(_split(q.reshape(B, rows * cols, -1), heads), k, v, attn.scale)
            local[:, i : i + 7, j : j + 7] = out.reshape(B, rows, cols, -1)
            local_significance[:, i : i + 7, j : j + 7] = a.mean(dim=(1, 2)).reshape(B, rows, cols)
    out = torch.cat([wide, local.reshape(B, N, -1)], dim=-1)
    return _project(attn, out, x, H, W), significance + local_significance.reshape(B, N)


def _reference_merge(attn, tokens, significance, sr):
    B, N, _ = tokens.shape
    order = torch.sort(significance, dim=1, stable=True).indices
    tokens = torch.stack([tokens[b, order[b]] for b in range(B)])
    merged = []
    for i, width in enumerate(REFERENCE_MERGES[sr]):
        f = getattr(attn, f"f{i + 1}")
        assert f.weight.shape == (1, width)
        group = tokens[:, int(N * REFERENCE_BOUNDS[sr][i]) : int(N * REFERENCE_BOUNDS[sr][i + 1])]
        for start in range(0, group.shape[1], width):
            chunk = group[:, start : start + width]
            merged.append(torch.einsum("bjc,j->bc", chunk, f.weight[0, : chunk.shape[1]]) + f.bias)
    return torch.stack(merged, dim=1)


def reference_significance_guided(attn, x, H, W, significance, sr):
    """kv1 of the tokens scanned by rows, kv2 of the tokens scanned by columns, each sorted by significance."""
    B, N, C = x.shape
    heads = attn.num_heads // 2

    def by_columns(t):
        return t.reshape(B, H, W, -1).transpose(1, 2).reshape(B, N, -1)

    scans = [(attn.kv1, x, significance), (attn.kv2, by_columns(x), by_columns(significance[..., None])[..., 0])]
    q = _split(attn.q(x), attn.num_heads)
    halves = []
    for half, (kv, tokens, scores) in enumerate(scans):
        k, v = _keys_values(kv(_reference_merge(attn, tokens, scores, sr)), heads)
        halves.append(_softmax_attention(q[:, half * heads : (half + 1) * heads], k, v, attn.scale)[0])
    return _project(attn, torch.cat(halves, dim=-1), x, H, W)


def reference_mhsa(attn, x, H, W):
    k, v = _keys_values(attn.kv(x), attn.num_heads)
    return _project(attn, _softmax_attention(_split(attn.q(x), attn.num_heads), k, v, attn.scale)[0], x, H, W)


def reference_forward(model, images):
    x, (H, W) = model.patch_embed1(images)
    pos = model.pos_embed
    if (H, W) != model.grid:  # bicubic from the stride-4 grid of img_size (in float32, as timm does)
        grid = pos.float().reshape(1, *model.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H, W), mode="bicubic", antialias=True, align_corners=False)
        pos = grid.flatten(2).transpose(1, 2).to(pos.dtype)
    x = x + pos
    for i in range(1, 5):
        if i > 1:
            x, (H, W) = getattr(model, f"patch_embed{i}")(x, (H, W))
        for block in getattr(model, f"block{i}"):
            y = block.norm1(x)
            if isinstance(block.attn, HybridScaleAttention):
                out, significance = reference_hybrid(block.attn, y, H, W)
                sr = block.attn.sr_ratio
            elif isinstance(block.attn, SignificanceGuidedAttention):
                out = reference_significance_guided(block.attn, y, H, W, significance, sr)
            else:
                out = reference_mhsa(block.attn, y, H, W)
            x = x + out
            x = x + block.mlp(block.norm2(x), (H, W))
        x = getattr(model, f"norm{i}")(x)
    return model.head(x.mean(dim=1))


def _random_merges(model):
    """Merges that differ along the chunk: the mean they start as would hide a wrong order within a chunk."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SignificanceGuidedAttention):
                for i in range(1, len(module.shares) + 1):
                    merge = getattr(module, f"f{i}")
                    merge.weight.normal_(1.0, 1.0).div_(merge.in_features)
                    merge.bias.normal_(0.0, 0.1)
    return model.eval()


def _images(*size, batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)), dtype=dtype)


def run_against_the_reference(model, images):
    """Run the model, then the reference of each of its attentions on the very input that attention got; return
    the model's output. Each significance-guided block gets the map of the hybrid-scale block just before it (and
    the same map makes the same order in both, whatever the rounding)."""
    calls = []
    hooks = [
        module.register_forward_hook(lambda module, args, out: calls.append((module, args, out)))
        for module in model.modules()
        if isinstance(module, (HybridScaleAttention, SignificanceGuidedAttention, Attention))
    ]
    output = model(images)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        previous = None
        for attn, (x, (H, W), significance), (out, passed_on) in calls:
            if isinstance(attn, HybridScaleAttention):
                expected, expected_significance = reference_hybrid(attn, x, H, W)
                torch.testing.assert_close(passed_on, expected_significance, rtol=1e-4, atol=1e-6)
            elif isinstance(attn, SignificanceGuidedAttention):
                assert significance is previous[2][1], "a significance-guided block reads its predecessor's map"
                expected = reference_significance_guided(attn, x, H, W, significance, previous[0].sr_ratio)
            else:
                expected = reference_mhsa(attn, x, H, W)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            previous = attn, (x, (H, W), significance), (out, passed_on)
    assert len(calls) == sum(len(getattr(model, f"block{i}")) for i in range(1, 5))
    return output


def _backward_reaches_every_weight(model, output, unused=()):
    model.zero_grad(set_to_none=True)
    output.square().mean().backward()
    for name, param in model.named_parameters():
        if name not in unused:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.fixture(scope="module")
def pico():
    torch.manual_seed(0)
    return _random_merges(timm.create_model("sgformer_pico", num_classes=10))


@pytest.mark.parametrize("name, published", [("sgformer_s", 22.55e6), ("sgformer_m", 38.69e6), ("sgformer_b", 77.95e6)])
def test_published_variants_have_the_reference_parameter_counts(name, published):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    assert abs(sum(p.numel() for p in model.parameters()) - published) < 0.01 * published
    names = {name for name, _ in model.named_parameters()}  # the reference's, so its weights load as they are
    assert {
        "pos_embed",
        "patch_embed1.conv.0.c.weight",
        "patch_embed1.conv.4.bn.bias",
        "patch_embed1.norm.weight",
        "block1.0.attn.q1.weight",
        "block1.0.attn.kv2.bias",
        "block1.0.attn.sr.weight",
        "block1.0.attn.norm.weight",
        "block1.1.attn.q.weight",
        "block1.1.attn.f3.weight",
        "block3.1.attn.f2.bias",
        "block2.0.mlp.fc1.weight",
        "block2.0.attn.lepe_conv.weight",
        "block2.0.mlp.dwconv.dwconv.weight",
        "block4.0.attn.kv.weight",
        "patch_embed2.conv2.c.weight",
        "patch_embed4.conv3.bn.weight",
        "norm4.weight",
        "head.weight",
    } <= names
    cfg = model.pretrained_cfg
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"], cfg["classifier"]) == (
        (3, 224, 224),
        0.9,
        "bicubic",
        "head",
    )
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD


def test_created_by_name_through_timm_and_the_model_builder():
    with torch.device("meta"):
        model = timm.create_model("sgformer_s", num_classes=7, drop_path_rate=0.1, img_size=256)
    assert model.head.out_features == 7 and model.pos_embed.shape == (1, 64 * 64, 64)
    assert model.block4[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert {"sgformer_pico", "sgformer_s", "sgformer_m", "sgformer_b"} <= set(timm.list_models("sgformer*"))
    config = ModelConfig(name="sgformer_pico", drop_path=0.05, kwargs={"img_size": 32}, grad_checkpointing=True)
    assert build_model(config, 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_sgformer_s_matches_the_reference_design_at_224():
    torch.manual_seed(0)
    model = _random_merges(timm.create_model("sgformer_s"))
    with torch.no_grad():
        run_against_the_reference(model, _images(224, 224, batch=1))


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (288, 288), (224, 288)])
def test_the_same_weights_run_at_other_sizes_as_the_reference_generalised(pico, size):
    """224 is the reference; 256, 288 and 224x288 pad windows (maps of 64, 72 and 56x72 tokens) and end groups
    in short chunks."""
    _backward_reaches_every_weight(pico, run_against_the_reference(pico, _images(*size)))


@pytest.mark.parametrize("size", [(32, 32), (64, 64)])
def test_whole_model_matches_the_reference_in_float64(pico, size):
    """The chain end to end, position embedding resampled at 64 px; one window and one reduced key per map at 32.
    float64: a near-tie in a significance map must not flip between two ways of computing it."""
    model = pico.double()
    try:
        images = _images(*size, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(model(images), reference_forward(model, images), rtol=1e-9, atol=1e-9)
    finally:
        pico.float()


@pytest.mark.parametrize("size", [(16, 16), (40, 56)])
def test_sizes_off_the_32_grid_still_run(pico, size):
    """Maps smaller than sr (4x4 tokens at 16 px, whose last stage has a single token: its first merge gets no
    group) or no multiple of it are padded for the reduction."""
    output = pico(_images(*size))
    assert output.shape == (2, 10)
    _backward_reaches_every_weight(pico, output, unused={"block3.1.attn.f1.weight", "block3.1.attn.f1.bias"})


def test_ties_in_significance_keep_their_scan_order():
    torch.manual_seed(0)
    attn = _random_merges(SignificanceGuidedAttention(32, 2, 4, qkv_bias=True))
    tokens = torch.randn(2, 16 * 16, 32)
    tied = torch.randint(0, 3, (2, 16 * 16)).float()  # three values: most tokens tie
    with torch.no_grad():
        out = attn(tokens, (16, 16), tied)[0]
        assert torch.equal(out, attn(tokens, (16, 16), tied)[0])
        torch.testing.assert_close(out, reference_significance_guided(attn, tokens, 16, 16, tied, 4))


def _loss_and_grads(checkpointing: bool):
    torch.manual_seed(0)
    model = timm.create_model("sgformer_pico", num_classes=10, drop_path_rate=0.2)
    model.set_grad_checkpointing(checkpointing)
    calls = []
    for block in model.block1:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)  # the same drop-path draws in both runs
    loss = F.cross_entropy(model.train()(_images(32, 32, batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


def test_grad_checkpointing_recomputes_blocks_and_changes_nothing():
    plain_loss, plain_grads, plain_calls = _loss_and_grads(False)
    ckpt_loss, ckpt_grads, ckpt_calls = _loss_and_grads(True)
    assert (plain_calls, ckpt_calls) == (2, 4)  # each block of stage 1 runs again in the backward pass
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_timm_classifier_features_and_parameter_groups():
    torch.manual_seed(0)
    model = timm.create_model("sgformer_pico", num_classes=10).eval()
    images = _images(64, 96)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (2, 2, 3, 128)  # a map at stride 32, channels last
        pooled = model.forward_head(features, pre_logits=True)
        model.reset_classifier(5)
        assert model(images).shape == (2, 5) and model.get_classifier().out_features == 5
        model.reset_classifier(0)
        torch.testing.assert_close(model(images), pooled)

    assert model.no_weight_decay() == {"pos_embed"}
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert group_of[id(named["pos_embed"])]["weight_decay"] == 0
    assert group_of[id(named["block1.1.attn.f1.weight"])]["weight_decay"] == 0.05
    scales = {name: group_of[id(p)]["lr_scale"] for name, p in named.items()}
    assert scales["pos_embed"] == scales["patch_embed1.conv.0.c.weight"] == min(scales.values())
    assert scales["block1.0.attn.q1.weight"] < scales["block2.0.attn.q1.weight"] < scales["block4.0.attn.q.weight"]
    assert scales["block1.1.attn.f1.weight"] < scales["block2.0.norm1.weight"] == scales["patch_embed2.conv1.c.weight"]


def test_recipes_load_and_their_models_build():
    digits = load_config("sgformer-digits", ["data.root=/x"])
    model = build_model(digits.model, 10)
    size = digits.data.img_size
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)

    imagenet = load_config("sgformer-s-a100", ["data.root=/x"], cluster="a100")
    assert (imagenet.model.name, imagenet.model.drop_path, imagenet.optim.name) == ("sgformer_s", 0.1, "adamw")
    assert imagenet.model.ema_decay > 0 and imagenet.optim.weight_decay == 0.05
    with torch.device("meta"):
        assert build_model(imagenet.model, 1000).head.out_features == 1000


@pytest.mark.parametrize("size, checkpointing", [((64, 64), False), ((48, 64), True)])
def test_torch_compile_traces_the_model_as_one_graph(size, checkpointing):
    # A graph break splits model.compile's graph and loses much of its speed: none, at any size.
    model = timm.create_model("sgformer_pico", num_classes=10, img_size=64)
    model.set_grad_checkpointing(checkpointing)
    traced = torch._dynamo.explain(model)(torch.randn(2, 3, *size))
    assert (traced.graph_count, traced.graph_break_count) == (1, 0), [b.reason for b in traced.break_reasons]
