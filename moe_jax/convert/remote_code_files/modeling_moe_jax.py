"""PyTorch port of moe_jax's TransformerLM for evaluation (remote code).

Written by moe_jax/convert/remote_code.py next to the weights, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

computes moe_jax's logits for models no stock Hugging Face class holds:
the xmoe, cosine, perturbed_cosine, hyper, tc_moe, moe_plus_plus and remoe
routers, sigmoid without renormalisation, DeepSeek-V3 with a learnt bias,
and LibMoE's LM stack (LayerNorm, partial RoPE, fused K/V, ReLU bias-free
experts, an output bias). It imports only torch and transformers.

What is ported is the EVAL forward of moe_jax (train=False): no router
noise, no expert dropout, HyperRouter at k_max, router state read and never
updated, no losses; dropless dispatch only (capacity_factor None). Every
router runs in float32 exactly as moe_jax/moe/routers/*.py; top-k is a
stable descending sort, so ties go to the lower index as in lax.top_k.

Parameter names are the flax paths joined with '.' ('layer_0.attention.
query.kernel'); kernels keep the flax (in, out) layout, so every linear map
is x @ kernel. A router's 'router_state' leaves (DeepSeek-V3 `bias`,
HyperRouter's frozen hypernetwork) are buffers beside its parameters.
Positions count from 0 at the first column whatever the padding (pad on
the right), as in moe_jax; position_ids and KV caches are not supported.

Dimension legend: B batch, S sequence, T = B*S tokens, D model width, H
heads, Dh head width, E experts, E' router width, K slots, F expert width,
N MoE++ constant experts, V vocabulary.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_moe_jax import MoeJaxConfig

# The LM stack's renormalisation epsilon (moe_jax routers/base.py).
RENORM_EPS = 1e-20
# Default temperatures of the cosine-family routers (routers/cosine.py).
XMOE_TEMPERATURE = 0.3
COSINE_TEMPERATURE = 0.2


# ------------------------------------------------------------ parameters ---

class Leaves(nn.Module):
  """Named parameters (and state buffers) of one flax module, any shapes."""

  def __init__(self, params, buffers=None):
    super().__init__()
    for name, shape in params.items():
      self.register_parameter(name, nn.Parameter(torch.empty(shape)))
    for name, shape in (buffers or {}).items():
      self.register_buffer(name, torch.zeros(shape))

  def tensors(self):
    out = dict(self.named_parameters(recurse=False))
    out.update(self.named_buffers(recurse=False))
    return out


class Dense(nn.Module):
  """flax nn.Dense: x @ kernel [in, out] (+ bias)."""

  def __init__(self, d_in, d_out, bias):
    super().__init__()
    self.kernel = nn.Parameter(torch.empty(d_in, d_out))
    self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

  def forward(self, x):
    y = x @ self.kernel.to(x.dtype)
    return y if self.bias is None else y + self.bias.to(y.dtype)


class Norm(nn.Module):
  """flax LayerNorm (scale, bias) or RMSNorm (scale), computed in float32."""

  def __init__(self, kind, width, eps):
    super().__init__()
    self.kind, self.eps = kind, eps
    self.scale = nn.Parameter(torch.empty(width))
    self.bias = (nn.Parameter(torch.empty(width)) if kind == 'layernorm'
                 else None)

  def forward(self, x):
    x = x.float()
    if self.kind == 'rmsnorm':
      mean2 = torch.mean(x * x, dim=-1, keepdim=True)
      return x * torch.rsqrt(mean2 + self.eps) * self.scale.float()
    # flax's fast variance: E[x^2] - E[x]^2, clipped at 0.
    mean = torch.mean(x, dim=-1, keepdim=True)
    var = torch.clamp(torch.mean(x * x, dim=-1, keepdim=True) - mean * mean,
                      min=0.0)
    mul = torch.rsqrt(var + self.eps) * self.scale.float()
    return (x - mean) * mul + self.bias.float()


# ----------------------------------------------------------------- RoPE ---

def rotary_dims(head_dim, fraction):
  """Rotated dims per head: the even number <= fraction * head_dim."""
  return 2 * int(head_dim * fraction // 2)


def _yarn_mscale(scale, mscale=1.0):
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(rotate, theta, scaling):
  """([R / 2] float32 inverse frequencies, cos/sin scale) (models/rope.py)."""
  base = 1.0 / theta ** (
      torch.arange(0, rotate, 2, dtype=torch.float32) / rotate)
  kind = (scaling or {}).get('rope_type', 'default')
  if kind == 'default':
    return base, 1.0
  if kind == 'linear':
    return base / scaling['factor'], 1.0
  if kind == 'llama3':
    factor = scaling['factor']
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    original = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > original / low, base / factor, base)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled), 1.0
  if kind == 'yarn':
    p = scaling
    factor = p['factor']
    original = p['original_max_position_embeddings']
    attention = p.get('attention_factor')
    if attention is None:
      if p.get('mscale') and p.get('mscale_all_dim'):
        attention = (_yarn_mscale(factor, p['mscale']) /
                     _yarn_mscale(factor, p['mscale_all_dim']))
      else:
        attention = _yarn_mscale(factor)
    beta_fast = p.get('beta_fast') or 32
    beta_slow = p.get('beta_slow') or 1

    def dim_of(rotations):
      return (rotate * math.log(original / (rotations * 2 * math.pi)) /
              (2 * math.log(theta)))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if p.get('truncate', True):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotate - 1)
    if low == high:
      high += 0.001
    ramp = torch.clamp((torch.arange(rotate // 2, dtype=torch.float32) - low)
                       / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv = (base / factor) * (1 - extrapolate) + base * extrapolate
    return inv, float(attention)
  raise ValueError(f'rope_scaling.rope_type {kind!r} is not implemented')


def apply_rope(x, cos, sin, rotate):
  """Rotate-half RoPE on the first `rotate` dims: x [B, S, H, Dh]."""
  if rotate == 0:
    return x
  half = rotate // 2
  x_rot, x_pass = x[..., :rotate].float(), x[..., rotate:]
  x1, x2 = x_rot[..., :half], x_rot[..., half:]
  rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
  return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


# ------------------------------------------------------------ attention ---

class Attention(nn.Module):
  """Causal MHA / GQA / MQA with (partial) RoPE (decoder.Attention)."""

  def __init__(self, m):
    super().__init__()
    d, h, dh = m['d_model'], m['num_heads'], m['head_dim']
    kv = m.get('num_kv_heads') or h
    bias = m.get('attention_bias', 'none')
    qkv_bias = bias != 'none'
    self.h, self.kv, self.dh = h, kv, dh
    self.fused = m.get('kv_projection', 'fused') == 'fused'
    self.qk_norm = m.get('qk_norm', 'none')
    eps = m.get('norm_eps', 1e-6)
    self.query = Dense(d, h * dh, qkv_bias)
    if self.fused:
      self.key_value = Dense(d, 2 * kv * dh, qkv_bias)
    else:
      self.key = Dense(d, kv * dh, qkv_bias)
      self.value = Dense(d, kv * dh, qkv_bias)
    if self.qk_norm == 'full':
      self.q_norm = Norm('rmsnorm', h * dh, eps)
      self.k_norm = Norm('rmsnorm', kv * dh, eps)
    elif self.qk_norm == 'per_head':
      self.q_norm = Norm('rmsnorm', dh, eps)
      self.k_norm = Norm('rmsnorm', dh, eps)
    self.out = Dense(h * dh, d, bias == 'all')

  def forward(self, x, cos, sin, rotate, mask):
    """x [B, S, D]; cos, sin [B, S, 1, R/2]; mask [B, 1, S, S] bool."""
    b, s, _ = x.shape
    q = self.query(x)
    if self.fused:
      k, v = torch.chunk(self.key_value(x), 2, dim=-1)
    else:
      k, v = self.key(x), self.value(x)
    if self.qk_norm == 'full':
      q, k = self.q_norm(q).to(x.dtype), self.k_norm(k).to(x.dtype)
    q = q.reshape(b, s, self.h, self.dh)
    k = k.reshape(b, s, self.kv, self.dh)
    v = v.reshape(b, s, self.kv, self.dh)
    if self.qk_norm == 'per_head':
      q, k = self.q_norm(q).to(x.dtype), self.k_norm(k).to(x.dtype)
    q, k = apply_rope(q, cos, sin, rotate), apply_rope(k, cos, sin, rotate)
    # Query head h reads K/V head h // (H / K), as jax.nn.dot_product_attention.
    group = self.h // self.kv
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))       # [B, *, S, Dh]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    logits = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(self.dh))
    # jax's masked value: -0.7 * the dtype's max, not -inf.
    logits = torch.where(mask, logits,
                         -0.7 * torch.finfo(torch.float32).max)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = (probs @ v).transpose(1, 2).reshape(b, s, self.h * self.dh)
    return self.out(out)


# --------------------------------------------------------------- experts ---

def activation_fn(h, activation):
  """[..., F] (or [..., 2F] = [gate | up] for swiglu) -> [..., F]."""
  if activation == 'relu':
    return F.relu(h)
  if activation == 'gelu':
    return F.gelu(h)
  if activation == 'gelu_tanh':
    return F.gelu(h, approximate='tanh')
  if activation == 'swiglu':
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up
  raise ValueError(f'activation {activation!r} is not implemented')


def ffn(x, w_in, w_out, b_in, b_out, activation):
  """act(x W_in + b_in) W_out + b_out: x [R, D] -> [R, D]."""
  h = x @ w_in.to(x.dtype)
  if b_in is not None:
    h = h + b_in.to(h.dtype)
  y = activation_fn(h, activation) @ w_out.to(x.dtype)
  return y if b_out is None else y + b_out.to(y.dtype)


class FFNParams(nn.Module):
  """One FFN or E stacked experts: w_in [(E,) D, F or 2F], w_out [(E,) F, D]."""

  def __init__(self, num_experts, d, width, activation, bias):
    super().__init__()
    lead = () if num_experts is None else (num_experts,)
    w = 2 * width if activation == 'swiglu' else width
    self.w_in = nn.Parameter(torch.empty(*lead, d, w))
    self.w_out = nn.Parameter(torch.empty(*lead, width, d))
    self.b_in = nn.Parameter(torch.empty(*lead, w)) if bias else None
    self.b_out = nn.Parameter(torch.empty(*lead, d)) if bias else None

  def expert(self, e=None):
    pick = (lambda p: p) if e is None else (lambda p: p[e])
    return tuple(None if p is None else pick(p) for p in (
        self.w_in, self.w_out, self.b_in, self.b_out))


# --------------------------------------------------------------- routers ---

def topk(v, k):
  """lax.top_k: the k largest, descending, ties to the lower index."""
  values, index = torch.sort(v, dim=-1, descending=True, stable=True)
  return values[..., :k], index[..., :k]


def renormalise(v):
  return v / (torch.sum(v, dim=-1, keepdim=True) + RENORM_EPS)


def linear_logits(p, x):
  z = x @ p['w'].float()
  return z + p['b'].float() if 'b' in p else z


def router_shapes(name, c):
  """({param: shape}, {state: shape}) of a router (each routers/*.py init)."""
  d, e = c['d_model'], c['num_experts']
  wb = lambda width: dict({'w': (d, width)}, **(
      {'b': (width,)} if c['router_init'] == 'torch_default' else {}))
  if name in ('smoe', 'sigmoid', 'deepseek_v2'):
    params = wb(e)
    if c['noise'] == 'noisy_topk':
      params['w_noise'] = (d, e)
    return params, {}
  if name == 'xmoe':
    x = xmoe_dim(c)
    return dict(wb(x), embed=(e, x)), {}
  if name in ('cosine', 'perturbed_cosine'):
    return dict(wb(e), b=(e,)), {}
  if name == 'hyper':
    h = c['hyper_hidden'] if c['hyper_hidden'] is not None else d // 4
    return {'embedding': (1, d)}, {
        'hyper_w1': (d, h), 'hyper_b1': (h,),
        'hyper_w2': (h, d * e + e), 'hyper_b2': (d * e + e,)}
  if name == 'deepseek_v3':
    return wb(e), {'bias': (e,)}
  if name == 'moe_plus_plus':
    width = moepp_width(c)
    if c['router_depth'] == 1:
      params = wb(width)
    else:
      params = {'w': (d, 8 * width), 'w_out': (8 * width, width)}
    if c['gate_residual']:
      params['gate_map'] = (width, width)
    return params, {}
  if name == 'tc_moe':
    return wb(2 * e + tc_num_null(c)), {}
  if name == 'remoe':
    return wb(e), {}
  raise ValueError(f'router {name!r} is not implemented')


def xmoe_dim(c):
  return c['xmoe_dim'] if c['xmoe_dim'] is not None else c['num_experts'] // 2


def moepp_width(c):
  return c['num_experts'] + c['n_const'] + c['n_copy'] + c['n_zero']


def tc_num_null(c):
  return c['num_null'] if c['num_null'] is not None else c['top_k']


def remoe_slots(c):
  if c['parity'].get('remoe_libmoe'):
    return c['top_k']
  if c['remoe_max_active'] is not None:
    return c['remoe_max_active']
  return min(2 * c['top_k'], c['num_experts'])


def temperature(c, default):
  return c['temperature'] if c['temperature'] is not None else default


# Each router's eval forward, as routers/*.py with train=False: x [T, D]
# float32 -> a dict with index [T, K] (E = no FFN compute), weight [T, K],
# choice [T, K] (-1 = inactive slot), logits [T, E'] and, for MoE++, copy
# [T] and const [T, N] weights.

def _flag(c, name):
  return bool(c['parity'].get(name, False))


def route_smoe(c, p, x, prev_logits):
  """Softmax top-k (smoe, deepseek_v2); renormalised = softmax(z_S)."""
  z = linear_logits(p, x)                                      # [T, E]
  top_z, index = topk(z, c['top_k'])                           # [T, K]
  if c['normalize_topk']:
    weight = torch.softmax(top_z, dim=-1)
  else:
    weight = torch.gather(torch.softmax(z, dim=-1), -1, index)
  return dict(index=index, weight=weight, choice=index, logits=z)


def route_sigmoid(c, p, x, prev_logits):
  """Sigmoid top-k, renormalised unless normalize_topk is False."""
  z = linear_logits(p, x)
  scores = torch.sigmoid(z)
  _, index = topk(scores, c['top_k'])
  top = torch.gather(scores, -1, index)
  weight = renormalise(top) if c['normalize_topk'] else top
  return dict(index=index, weight=weight, choice=index, logits=z)


def route_xmoe(c, p, x, prev_logits):
  """Low-rank hypersphere scores s = <r / |r|, eps_e>, softmax(s / tau)."""
  r = linear_logits(p, x)                                      # [T, X]
  r_hat = r / torch.clamp(torch.linalg.norm(r, dim=-1, keepdim=True),
                          min=1e-4)
  s = r_hat @ p['embed'].float().T                             # [T, E]
  probs = torch.softmax(s / temperature(c, XMOE_TEMPERATURE), dim=-1)
  if _flag(c, 'xmoe_double_softmax'):
    probs = torch.softmax(probs, dim=-1)   # D2: LibMoE's second softmax.
  top, index = topk(probs, c['top_k'])
  return dict(index=index, weight=renormalise(top), choice=index, logits=s)


def _route_cosine_like(c, p, x, theta):
  w = p['w'].float()
  dots = x @ w
  x_norm = torch.linalg.norm(x, dim=-1, keepdim=True)         # [T, 1]
  w_norm = torch.linalg.norm(w, dim=0, keepdim=True)          # [1, E]
  if theta is None:
    cos = dots / (torch.clamp(x_norm, min=1e-12) *
                  torch.clamp(w_norm, min=1e-12))
  else:
    cos = dots / ((x_norm + theta) * (w_norm + theta))
  tau = temperature(c, COSINE_TEMPERATURE)
  bias = p['b'].float()
  if _flag(c, 'bias_on_probs'):
    # D10 parity: bias on the probabilities, softmax over the selected p + b.
    probs = torch.softmax(cos / tau, dim=-1)
    top, index = topk(probs + bias, c['top_k'])
    return dict(index=index, weight=torch.softmax(top, dim=-1), choice=index,
                logits=cos / tau)
  logits = cos / tau + bias
  top, index = topk(logits, c['top_k'])
  return dict(index=index, weight=torch.softmax(top, dim=-1), choice=index,
              logits=logits)


def route_cosine(c, p, x, prev_logits):
  return _route_cosine_like(c, p, x, None)


def route_perturbed_cosine(c, p, x, prev_logits):
  return _route_cosine_like(c, p, x, c['cosine_theta'])


def route_hyper(c, p, x, prev_logits):
  """HyperRouter: [W | b] from the frozen hypernetwork; evaluated at k_max
  (= top_k), so every slot is active."""
  e = c['num_experts']
  hidden = F.relu(p['embedding'].float() @ p['hyper_w1'].float() +
                  p['hyper_b1'].float())
  flat = hidden @ p['hyper_w2'].float() + p['hyper_b2'].float()
  wb = flat.reshape(e, c['d_model'] + 1)
  z = x @ wb[:, :-1].T + wb[:, -1]                             # [T, E]
  top_z, index = topk(z, c['top_k'])
  return dict(index=index, weight=torch.softmax(top_z, dim=-1), choice=index,
              logits=z)


def route_deepseek_v3(c, p, x, prev_logits):
  """Selection on sigmoid + bias (group-limited); unbiased renormalised
  weights x routed_scaling_factor."""
  e = c['num_experts']
  z = linear_logits(p, x)
  s = torch.sigmoid(z)
  biased = s + p['bias'].float()
  if c['n_group'] > 1:
    t = biased.shape[0]
    grouped = biased.reshape(t, c['n_group'], e // c['n_group'])
    group_score = torch.sum(topk(grouped, 2)[0], dim=-1)        # [T, G]
    _, keep = topk(group_score, c['topk_group'])
    kept = torch.zeros_like(group_score, dtype=torch.bool).scatter(
        -1, keep, True)
    # D6b parity masks the dropped groups with 0 instead of -inf.
    fill = 0.0 if _flag(c, 'group_mask_zero') else -math.inf
    biased = torch.where(kept[:, :, None], grouped,
                         torch.full_like(grouped, fill)).reshape(t, e)
  _, index = topk(biased, c['top_k'])
  top = torch.gather(s, -1, index)                             # unbiased
  weight = renormalise(top) * c['routed_scaling_factor']
  return dict(index=index, weight=weight, choice=index, logits=z)


def route_moe_plus_plus(c, p, x, prev_logits):
  """MoE++: FFN, then constant, copy and zero experts in one softmax."""
  e = c['num_experts']
  if c['router_depth'] == 1:
    z = linear_logits(p, x)                                    # [T, E']
  else:
    z = torch.tanh(linear_logits(p, x)) @ p['w_out'].float()
  if c['gate_residual'] and prev_logits is not None:
    z = z + prev_logits.float() @ p['gate_map'].float()
  probs = torch.softmax(z, dim=-1)
  top, choice = topk(probs, c['top_k'])
  const_start = e
  copy_start = e + c['n_const']
  zero_start = copy_start + c['n_copy']
  if c['zero_weight_mode'] == 'drop':
    weight = renormalise(torch.where(choice >= zero_start,
                                     torch.zeros_like(top), top))
  else:
    weight = renormalise(top)
  # DropTop before the special slots are split off.
  choice, weight = drop_top_slots(choice, weight, c['drop_top'])
  is_ffn = (choice >= 0) & (choice < e)
  is_copy = (choice >= copy_start) & (choice < zero_start)
  zeros = torch.zeros_like(weight)
  const_onehot = ((choice - const_start)[..., None] == torch.arange(
      c['n_const'], device=x.device)).to(weight.dtype)         # [T, K, N]
  return dict(index=torch.where(is_ffn, choice, torch.full_like(choice, e)),
              weight=torch.where(is_ffn, weight, zeros), choice=choice,
              logits=z,
              copy=torch.sum(torch.where(is_copy, weight, zeros), dim=-1),
              const=torch.einsum('tkn,tk->tn', const_onehot, weight),
              drop_top_done=True)


def route_tc_moe(c, p, x, prev_logits):
  """TC-MoE: positive / negative copies and null slots; signed weights."""
  e = c['num_experts']
  slots = torch.arange(2 * e + tc_num_null(c), device=x.device)
  offset = torch.zeros(slots.shape, dtype=torch.float32, device=x.device)
  offset[slots >= e] = c['tc_neg_offset']
  offset[slots >= 2 * e] = c['tc_null_offset']
  z = linear_logits(p, x) + offset                             # [T, 2E+N]
  probs = torch.softmax(z, dim=-1)
  top, choice = topk(probs, c['top_k'])
  is_null = choice >= 2 * e
  null_mass = torch.sum(probs[:, 2 * e:], dim=-1, keepdim=True)
  denom = torch.sum(torch.where(is_null, torch.zeros_like(top), top), dim=-1,
                    keepdim=True) + null_mass
  sign = torch.ones_like(top)
  sign[choice >= e] = -1.0
  sign[is_null] = 0.0
  weight = sign * top / (denom + RENORM_EPS)
  index = torch.where(is_null, torch.full_like(choice, e), choice % e)
  return dict(index=index, weight=weight, choice=choice, logits=z)


def route_remoe(c, p, x, prev_logits):
  """ReMoE: the K_slot largest ReLU(z); zero values cost nothing."""
  z = linear_logits(p, x)
  value, index = topk(F.relu(z), remoe_slots(c))
  if _flag(c, 'remoe_libmoe'):
    # D8 parity: LibMoE runs every one of the k experts, even at value 0.
    return dict(index=index, weight=value, choice=index, logits=z)
  active = value > 0
  sentinel = torch.full_like(index, c['num_experts'])
  return dict(
      index=torch.where(active, index, sentinel), weight=value, logits=z,
      choice=torch.where(active, index, torch.full_like(index, -1)))


ROUTES = {
    'smoe': route_smoe,
    'deepseek_v2': route_smoe,
    'sigmoid': route_sigmoid,
    'xmoe': route_xmoe,
    'cosine': route_cosine,
    'perturbed_cosine': route_perturbed_cosine,
    'hyper': route_hyper,
    'deepseek_v3': route_deepseek_v3,
    'moe_plus_plus': route_moe_plus_plus,
    'tc_moe': route_tc_moe,
    'remoe': route_remoe,
}


def drop_top_slots(choice, weight, n):
  """DropTop-n (routers/base.py): remove each token's n highest-ranked
  active slots, rescale the rest by sum|w| / sum|w_kept|."""
  if n == 0:
    return choice, weight
  active = choice >= 0
  rank = torch.cumsum(active.long(), dim=-1) - 1
  dropped = active & (rank < n)
  kept = torch.where(dropped, torch.zeros_like(weight), weight)
  total = torch.sum(torch.abs(weight), dim=-1, keepdim=True)
  kept_total = torch.sum(torch.abs(kept), dim=-1, keepdim=True)
  safe = torch.where(kept_total > 0, kept_total, torch.ones_like(kept_total))
  scale = torch.where(kept_total > 0, total / safe,
                      torch.zeros_like(kept_total))
  return torch.where(dropped, torch.full_like(choice, -1), choice), kept * scale


class Router(nn.Module):
  """Owns a router's params and state: 'router.{w, b, ...}' like flax."""

  def __init__(self, name, c):
    super().__init__()
    self.name_, self.c = name, c
    params, state = router_shapes(name, c)
    self.router = Leaves(params, state)

  def forward(self, x, prev_logits):
    out = ROUTES[self.name_](self.c, self.router.tensors(), x.float(),
                             prev_logits)
    if self.c['drop_top'] and not out.pop('drop_top_done', False):
      e = self.c['num_experts']
      choice, weight = drop_top_slots(out['choice'], out['weight'],
                                      self.c['drop_top'])
      out.update(choice=choice, weight=weight, index=torch.where(
          choice < 0, torch.full_like(choice, e), out['index']))
    return out


class ConstantExperts(nn.Module):
  """MoE++ constant experts: a1 x + a2 v_n, [a1, a2] = softmax(x W_n)."""

  def __init__(self, num, d):
    super().__init__()
    self.gate = nn.Parameter(torch.empty(num, d, 2))
    self.value = nn.Parameter(torch.empty(num, d))

  def forward(self, x, weight):
    """x [T, D], weight [T, N] -> [T, D]."""
    alpha = torch.softmax(torch.einsum('td,ndj->tnj', x.float(),
                                       self.gate.float()), dim=-1)
    a_x = torch.sum(weight * alpha[..., 0], dim=-1, keepdim=True)
    a_v = torch.einsum('tn,nd->td', weight * alpha[..., 1], self.value.float())
    return (a_x * x + a_v).to(x.dtype)


class MoEBlock(nn.Module):
  """router -> experts (a loop over E) -> combine (+ MoE++ / shared experts)."""

  def __init__(self, f, c, router):
    super().__init__()
    if f.get('capacity_factor') is not None:
      raise ValueError('capacity_factor: only dropless MoE layers (None) are '
                       'ported')
    self.f, self.c = f, c
    self.e, self.k, self.d = f['num_experts'], f['top_k'], f['d_model']
    self.activation = f.get('activation', 'relu')
    bias = bool(f.get('expert_bias', False))
    self.router = Router(router, c)
    self.experts = FFNParams(self.e, self.d, f['expert_width'],
                             self.activation, bias)
    self.shared_experts = f.get('shared_experts', 0)
    self.shared_mix = f.get('shared_mix', 'add')
    if self.shared_experts:
      width = self.shared_experts * (f.get('shared_width') or
                                     f['expert_width'])
      self.shared = FFNParams(None, self.d, width, self.activation, bias)
      if self.shared_mix == 'sigmoid_gate':
        self.shared_gate = nn.Parameter(torch.empty(self.d, 1))
    self.n_const = c['n_const'] if router == 'moe_plus_plus' else 0
    if self.n_const:
      self.constant = ConstantExperts(self.n_const, self.d)

  def forward(self, x, prev_logits):
    """x [B, S, D] -> (y [B, S, D], router logits [T, E'])."""
    b, s, d = x.shape
    xt = x.reshape(b * s, d)                                   # [T, D]
    out = self.router(xt, prev_logits)
    # MoE++ reference parity: the experts (not the router) see k * x.
    scale = self.k if self.c['parity'].get('moepp_mul_topk') else 1
    expert_in = xt * scale
    y = torch.zeros_like(expert_in)
    index, weight = out['index'], out['weight']
    for e in range(self.e):
      token, slot = torch.nonzero(index == e, as_tuple=True)
      if token.numel() == 0:
        continue
      rows = ffn(expert_in[token], *self.experts.expert(e), self.activation)
      y.index_add_(0, token, rows * weight[token, slot, None].to(rows.dtype))
    if 'copy' in out:
      y = y + out['copy'][:, None].to(y.dtype) * expert_in
      if self.n_const:
        y = y + self.constant(expert_in, out['const'])
    if self.shared_experts:
      y_shared = ffn(xt, *self.shared.expert(), self.activation)
      if self.shared_mix == 'sigmoid_gate':
        gate = torch.sigmoid(xt.float() @ self.shared_gate.float())
        y = y + gate.to(y_shared.dtype) * y_shared
      elif self.shared_mix == 'add':
        y = y + y_shared
      else:
        y = 0.5 * (y + y_shared)
    return y.reshape(b, s, d).to(x.dtype), out['logits']


class DenseFFNBlock(nn.Module):
  """The dense baseline FFN: 'ffn.{w_in, w_out, b_in, b_out}'."""

  def __init__(self, f):
    super().__init__()
    self.activation = f.get('activation', 'relu')
    self.ffn = FFNParams(None, f['d_model'], f['width'], self.activation,
                         bool(f.get('use_bias', True)))

  def forward(self, x, prev_logits):
    return ffn(x, *self.ffn.expert(), self.activation).to(x.dtype), None


class DecoderLayer(nn.Module):
  """x += Attn(N1 x); x += FFN(N2 x)."""

  def __init__(self, m, router_config):
    super().__init__()
    norm, eps, d = (m.get('norm', 'layernorm'), m.get('norm_eps', 1e-6),
                    m['d_model'])
    self.ln1 = Norm(norm, d, eps)
    self.attention = Attention(m)
    self.ln2 = Norm(norm, d, eps)
    self.dense = bool(m.get('dense_ffn', False))
    if self.dense:
      self.ffn = DenseFFNBlock(m['ffn'])
    else:
      self.moe = MoEBlock(m['ffn'], router_config,
                          m['ffn'].get('router', 'smoe'))

  def forward(self, x, cos, sin, rotate, mask, prev_logits):
    x = x + self.attention(self.ln1(x).to(x.dtype), cos, sin, rotate, mask)
    block = self.ffn if self.dense else self.moe
    y, logits = block(self.ln2(x).to(x.dtype), prev_logits)
    return x + y, logits


# ----------------------------------------------------------------- model ---

class MoeJaxPreTrainedModel(PreTrainedModel):
  config_class = MoeJaxConfig
  # No submodule carries this name: checkpoint keys are used as they are.
  base_model_prefix = 'moe_jax_model'
  _no_split_modules = ['DecoderLayer']

  @torch.no_grad()
  def _init_weights(self, module):
    """Random init for from_config (loading overwrites every tensor)."""
    for name, p in list(module.named_parameters(recurse=False)) + list(
        module.named_buffers(recurse=False)):
      if name == 'scale':
        nn.init.ones_(p)
      elif p.dim() >= 2:
        nn.init.normal_(p, std=0.02)
      else:
        nn.init.zeros_(p)


class MoeJaxForCausalLM(MoeJaxPreTrainedModel):
  """tokens [B, S] -> logits [B, S, V] float32, as moe_jax's TransformerLM."""

  def __init__(self, config):
    super().__init__(config)
    m = config.moe_jax_kwargs
    self.m = m
    self.embedding = nn.Parameter(torch.empty(m['vocab_size'], m['d_model']))
    router_config = config.moe_jax_router
    for i in range(m['num_layers']):
      self.add_module(f'layer_{i}', DecoderLayer(m, router_config))
    self.ln_final = Norm(m.get('norm', 'layernorm'), m['d_model'],
                         m.get('norm_eps', 1e-6))
    self.tie = bool(m.get('tie_embeddings', False))
    if not self.tie:
      self.output = Dense(m['d_model'], m['vocab_size'],
                          bool(m.get('output_bias', True)))
    self.rotate = rotary_dims(m['head_dim'], m.get('rope_fraction', 0.5))
    self.post_init()

  def get_input_embeddings(self):
    return None

  def get_output_embeddings(self):
    return None

  def forward(self, input_ids, attention_mask=None, return_dict=None,
              **kwargs):
    """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding)."""
    del kwargs  # position_ids, caches, ...: not supported (module docstring).
    m = self.m
    b, s = input_ids.shape
    x = self.embedding[input_ids]                              # [B, S, D]
    inv_freq, scale = inverse_frequencies(
        self.rotate, m.get('rope_theta', 10000.0), m.get('rope_scaling'))
    positions = torch.arange(s, device=x.device, dtype=torch.float32)
    angle = positions[:, None] * inv_freq.to(x.device)         # [S, R/2]
    cos = (torch.cos(angle) * scale)[None, :, None, :]
    sin = (torch.sin(angle) * scale)[None, :, None, :]
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool, device=x.device))
    mask = mask[None, None]                                    # [1,1,S,S]
    if attention_mask is not None:
      mask = mask & attention_mask.bool()[:, None, None, :]
    prev_logits = None
    for i in range(m['num_layers']):
      x, prev_logits = getattr(self, f'layer_{i}')(
          x, cos, sin, self.rotate, mask, prev_logits)
    x = self.ln_final(x)
    if self.tie:
      logits = x.float() @ self.embedding.float().T
    else:
      logits = x.float() @ self.output.kernel.float()
      if self.output.bias is not None:
        logits = logits + self.output.bias.float()
    if return_dict is False:
      return (logits,)
    return CausalLMOutput(logits=logits)
