"""Equivalence with Hugging Face transformers (PyTorch, CPU): an implementation this project did not
write checks every layer at once.

For each of MarianMTModel, T5ForConditionalGeneration (v1.0 and v1.1), BertForMaskedLM,
GPT2LMHeadModel and LlamaForCausalLM (grouped-query attention), a small random-initialised
reference model and a tokenizer are saved to a folder (no network), converted with
transformer/interop into a workdir, and compared: logits and log-probabilities on padded batches,
greedy decoding against the reference's generate, fill-mask top-5, and the round trip
reference -> workdir -> reference bit for bit. The references number their vocabularies as the real
checkpoints do (GPT-2: no pad, bos = eos = the last id; Marian: eos 0, pad last and decoding from
pad; T5: pad 0, eos 1, decoding from pad; BERT: pad 0, the other specials amid the words; Llama:
unk 0, bos 1, eos 2, no pad), so the relabelling into the project's special ids is exercised too.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

from configs import bert_mlm, gpt_causal, original, workdir as workdir_config
from configs.common import REPO_ROOT
from transformer import decode, variants
from transformer.interop import huggingface
from transformer.interop.rules import UnsupportedConfigError

WORDS = ('a man woman dog runs walks over the field with red ball green tree sits on bench child '
         'plays in water big small house street car blue two three people look at sky').split()
CONFIGS = {'original': original, 'bert_mlm': bert_mlm, 'gpt_causal': gpt_causal}

TOLERANCE = 1e-4  # float32; the measured differences are about 1e-6
# The project's special ids 0..6, written out (transformer/data/tokenizer.py).
SPECIAL_NAMES = ('pad', 'unk', 'bos', 'eos', 'mask', 'cls', 'sep')


def small_float32(variant):
  """The base config of an import, computing in float32 as the references do."""
  config = CONFIGS[variant].get_config('small')
  config.dtype = 'float32'
  return config


def _tokenizer(tokens: list[str], **special_tokens):
  vocab = {token: i for i, token in enumerate(tokens)}
  backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token=special_tokens.get('unk_token')))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def _gpt2():
  tokens = [*WORDS, '<|endoftext|>']
  eos = len(tokens) - 1
  config = transformers.GPT2Config(vocab_size=len(tokens), n_embd=32, n_layer=2, n_head=4,
                                   n_positions=64, bos_token_id=eos, eos_token_id=eos,
                                   layer_norm_epsilon=0.05)  # not a default: must be carried
  special = dict(bos_token='<|endoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>')
  return transformers.GPT2LMHeadModel(config), _tokenizer(tokens, **special)


def _marian():
  tokens = ['</s>', '<unk>', *WORDS, '<pad>']
  pad = len(tokens) - 1
  config = transformers.MarianConfig(
      vocab_size=len(tokens), decoder_vocab_size=len(tokens), d_model=32, encoder_layers=2,
      decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
      decoder_ffn_dim=64, max_position_embeddings=64, activation_function='swish',
      scale_embedding=True, pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad,
      forced_eos_token_id=None)
  model = transformers.MarianMTModel(config)
  with torch.no_grad():
    model.final_logits_bias.normal_(0, 0.5)
  return model, _tokenizer(tokens, eos_token='</s>', unk_token='<unk>', pad_token='<pad>')


def _bert():
  tokens = ['[PAD]', *WORDS[:20], '[UNK]', '[CLS]', '[SEP]', '[MASK]', *WORDS[20:]]
  config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, pad_token_id=0,
                                   layer_norm_eps=0.05)  # not a default: must be carried
  special = dict(pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]', sep_token='[SEP]',
                 mask_token='[MASK]')
  return transformers.BertForMaskedLM(config), _tokenizer(tokens, **special)


def _llama():
  tokens = ['<unk>', '<s>', '</s>', *WORDS]
  config = transformers.LlamaConfig(
      vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=None,
      rope_parameters={'rope_type': 'default', 'rope_theta': 500.0})  # not the defaults
  return transformers.LlamaForCausalLM(config), _tokenizer(
      tokens, unk_token='<unk>', bos_token='<s>', eos_token='</s>')


def _t5(feed_forward_proj: str, tied: bool):
  def make():
    tokens = ['<pad>', '</s>', '<unk>', *WORDS]
    config = transformers.T5Config(
        vocab_size=len(tokens), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied, layer_norm_epsilon=0.05,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config), _tokenizer(
        tokens, pad_token='<pad>', eos_token='</s>', unk_token='<unk>')
  return make


REFERENCES = {'gpt2': _gpt2, 'marian': _marian, 'bert': _bert, 'llama': _llama,
              't5_v1_0': _t5('relu', tied=True), 't5_v1_1': _t5('gated-gelu', tied=False)}


def _randomize(model):
  """Every learned tensor random, LayerNorm scales and biases included: the default
  initialisation (scales 1, biases 0) would hide a swapped or dropped one."""
  with torch.no_grad():
    for name, value in model.named_parameters():
      if 'embed_positions' not in name:  # Marian's fixed sinusoids
        value.normal_(0, 0.3)
  return model


class Converted:
  """A reference model saved to a folder, and its conversion into a workdir."""

  def __init__(self, name: str, root):
    self.name = name
    torch.manual_seed(0)
    self.reference, tokenizer = REFERENCES[name]()
    _randomize(self.reference).eval()
    self.hf_dir, self.workdir = str(root / 'hf'), str(root / 'workdir')
    self.reference.save_pretrained(self.hf_dir)
    tokenizer.save_pretrained(self.hf_dir)
    self.hf_config = self.reference.config
    huggingface.import_folder(self.hf_dir, self.workdir,
                              small_float32)
    self.config = workdir_config.get_config(self.workdir)  # as launch.main would read it
    self.vocab = huggingface.workdir_vocab(self.config)
    self.params = huggingface.restore_params(self.config, self.workdir, self.vocab.size)
    self.model = variants.build_model(self.config, self.vocab.size)

  def ours(self, hf_ids, valid):
    """Reference ids -> ours, pad 0 where not valid."""
    return jnp.asarray(np.where(valid, self.vocab.ids_from_hf(hf_ids), 0), jnp.int32)


@pytest.fixture(scope='module', params=sorted(REFERENCES))
def converted(request, tmp_path_factory):
  return Converted(request.param, tmp_path_factory.mktemp(request.param))


def _padded_batch(rng, num_real: int, lengths):
  ids = rng.integers(0, num_real, (len(lengths), max(lengths)))
  return ids, np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]


def _real_ids(c: Converted) -> np.ndarray:
  """Reference ids of ordinary words (no specials)."""
  return np.flatnonzero(c.vocab.hf_to_ours >= len(SPECIAL_NAMES))


def _logits(c: Converted, rng):
  """(ours relabelled to the reference's vocabulary, the reference's, valid positions)."""
  words = _real_ids(c)
  ids, valid = _padded_batch(rng, len(words), [9, 6, 3])
  ids = words[ids]
  mask = torch.tensor(valid.astype(np.int64))
  if c.config.variant == 'original':
    target, target_valid = _padded_batch(rng, len(words), [7, 8, 2])
    start = c.hf_config.decoder_start_token_id
    target = np.concatenate([np.full((3, 1), start), words[target]], axis=1)
    target_valid = np.concatenate([np.ones((3, 1), bool), target_valid], axis=1)
    with torch.no_grad():
      reference = c.reference(input_ids=torch.tensor(ids), attention_mask=mask,
                              decoder_input_ids=torch.tensor(target),
                              decoder_attention_mask=torch.tensor(target_valid.astype(np.int64)))
    ours_target = c.ours(target, target_valid).at[:, 0].set(decode.BOS_ID)
    ours = c.model.apply({'params': c.params}, c.ours(ids, valid), ours_target)
    valid = target_valid
  else:
    with torch.no_grad():
      reference = c.reference(input_ids=torch.tensor(ids), attention_mask=mask)
    ours = c.model.apply({'params': c.params}, c.ours(ids, valid))
  return np.asarray(ours)[..., c.vocab.hf_to_ours], reference.logits.numpy(), valid, ours


def test_logits_and_log_probs_match_the_reference(converted):
  ours, reference, valid, ours_full = _logits(converted, np.random.default_rng(0))
  difference = np.abs(ours - reference)[valid].max()
  print(f'{converted.name}: max |logit difference| {difference:.1e} (logits up to '
        f'{np.abs(reference[valid]).max():.2f})')  # the README's table: pytest -s -k logits
  assert difference < TOLERANCE
  # Over our whole vocabulary: the extra ids (specials the reference lacks) take no probability.
  ours_log_probs = np.asarray(jax.nn.log_softmax(ours_full))[..., converted.vocab.hf_to_ours]
  reference_log_probs = np.asarray(jax.nn.log_softmax(reference))
  assert np.abs(ours_log_probs - reference_log_probs)[valid].max() < TOLERANCE


def test_round_trip_reference_to_workdir_to_reference_is_exact(converted, tmp_path):
  out = str(tmp_path / 'exported')
  huggingface.export_workdir(converted.config, converted.workdir, out)
  exported = load_file(os.path.join(out, 'model.safetensors'))
  original_state = {k: v.numpy() for k, v in converted.reference.state_dict().items()}
  for name, value in exported.items():
    np.testing.assert_array_equal(value, original_state[name], err_msg=name)
  reloaded = type(converted.reference).from_pretrained(out).eval()
  for name, value in reloaded.state_dict().items():  # tied and fixed tensors included
    np.testing.assert_array_equal(value.numpy(), original_state[name], err_msg=name)
  with open(os.path.join(out, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['architectures'] == [type(converted.reference).__name__]


@pytest.mark.parametrize('name', ['marian', 't5_v1_1'])
def test_greedy_translation_matches_reference_generate(tmp_path_factory, name):
  c = Converted(name, tmp_path_factory.mktemp(f'{name}_greedy'))
  words = _real_ids(c)
  rng = np.random.default_rng(1)
  ids, valid = _padded_batch(rng, len(words), [8, 5, 3, 7])
  ids = np.where(valid, words[ids], c.hf_config.pad_token_id)
  max_len = 12
  pad = c.hf_config.pad_token_id
  with torch.no_grad():
    reference = c.reference.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)),
        max_new_tokens=max_len, num_beams=1, do_sample=False, bad_words_ids=[[pad]],
        decoder_start_token_id=pad, eos_token_id=c.hf_config.eos_token_id,
        pad_token_id=pad).numpy()[:, 1:]
  ours = decode.translate(c.model, c.params, c.ours(ids, valid), max_len=max_len)
  ours = c.vocab.ids_to_hf(np.asarray(ours))[:, :reference.shape[1]]
  np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_greedy_generation_with_left_padded_prompts_matches_reference(tmp_path_factory, name):
  c = Converted(name, tmp_path_factory.mktemp(f'{name}_greedy'))
  words = _real_ids(c)
  eos = c.hf_config.eos_token_id
  rng = np.random.default_rng(2)
  lengths = np.array([6, 2, 4])
  ids = words[rng.integers(0, len(words), (3, 6))]
  valid = np.arange(6)[None] >= (6 - lengths)[:, None]  # left padding
  ids = np.where(valid, ids, eos)
  max_len = 10
  with torch.no_grad():
    reference = c.reference.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)),
        max_new_tokens=max_len, do_sample=False, pad_token_id=eos).numpy()[:, 6:]
  ours = c.vocab.ids_to_hf(np.asarray(decode.generate(c.model, c.params, c.ours(ids, valid),
                                                      max_len=max_len)))
  for row_ours, row_reference in zip(ours, reference):
    end = list(row_reference).index(eos) + 1 if eos in row_reference else max_len
    np.testing.assert_array_equal(row_ours[:end], row_reference[:end])


def test_fill_mask_top5_matches_reference(tmp_path_factory):
  c = Converted('bert', tmp_path_factory.mktemp('bert_fill'))
  tok = transformers.AutoTokenizer.from_pretrained(c.hf_dir)
  words = _real_ids(c)
  rng = np.random.default_rng(3)
  body = words[rng.integers(0, len(words), (2, 8))]
  body[0, 2] = body[0, 5] = body[1, 7] = tok.mask_token_id
  ids = np.concatenate([np.full((2, 1), tok.cls_token_id), body,
                        np.full((2, 1), tok.sep_token_id)], axis=1)
  with torch.no_grad():
    logits = c.reference(input_ids=torch.tensor(ids)).logits
  logits[..., tok.pad_token_id] = -float('inf')  # the project never proposes padding
  reference_probs, reference_ids = torch.softmax(logits, -1).topk(5)
  top_ids, top_probs = decode.fill_mask(c.model, c.params, c.ours(ids, np.ones_like(ids, bool)),
                                        top_k=5, mask_id=decode.MASK_ID)
  is_mask = ids == tok.mask_token_id
  assert is_mask.sum() == 3
  np.testing.assert_array_equal(c.vocab.ids_to_hf(np.asarray(top_ids)[is_mask]),
                                reference_ids.numpy()[is_mask])
  np.testing.assert_allclose(np.asarray(top_probs)[is_mask], reference_probs.numpy()[is_mask],
                             atol=TOLERANCE)


def test_special_tokens_land_on_the_project_ids(converted):
  tok = transformers.AutoTokenizer.from_pretrained(converted.hf_dir)
  ours = converted.vocab
  for our_id, name in enumerate(SPECIAL_NAMES):
    hf_id = getattr(tok, f'{name}_token_id')
    if name == 'bos' and converted.config.variant == 'original':
      hf_id = converted.hf_config.decoder_start_token_id  # Marian decodes from its pad
    if hf_id is not None:
      assert ours.our_to_hf[our_id] == hf_id, name
  # Every reference id has exactly one home, and text survives the relabelling.
  assert sorted(ours.our_to_hf[ours.canonical]) == list(range(ours.hf_size))
  from transformer import data  # pylint: disable=import-outside-toplevel
  project_tokenizer = data.get_tokenizer(converted.config)
  text = 'a dog runs over the field'
  assert project_tokenizer.decode(project_tokenizer.encode(text)) == text
  np.testing.assert_array_equal(ours.ids_to_hf(project_tokenizer.encode(text)),
                                tok.encode(text, add_special_tokens=False))


# --- What cannot be expressed is refused, with the field named ----------------------------------

@pytest.mark.parametrize('field, value, reference', [
    ('position_embedding_type', 'relative_key', 'bert'),
    ('add_cross_attention', True, 'gpt2'),
    ('share_encoder_decoder_embeddings', False, 'marian'),
    ('model_type', 'bart', 'gpt2'),
    ('head_dim', 16, 'llama'),
    ('feed_forward_proj', 'gated-relu', 't5_v1_0'),
])
def test_unsupported_reference_config_is_refused_naming_the_field(tmp_path, field, value,
                                                                  reference):
  torch.manual_seed(0)
  model, tokenizer = REFERENCES[reference]()
  hf_dir = tmp_path / 'hf'
  model.save_pretrained(hf_dir)
  tokenizer.save_pretrained(hf_dir)
  config_path = hf_dir / 'config.json'
  hf_config = json.loads(config_path.read_text())
  hf_config[field] = value
  config_path.write_text(json.dumps(hf_config))
  with pytest.raises(UnsupportedConfigError, match=field):
    huggingface.import_folder(str(hf_dir), str(tmp_path / 'w'),
                              small_float32)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('overrides, field', [
    (dict(attention_bias=True), 'scale_embeddings'),  # GPT-2 does not scale by sqrt(d)
    (dict(scale_embeddings=False), 'attention_bias=True'),  # gpt_causal has no attention biases
])
def test_export_refuses_a_model_the_reference_cannot_express(tmp_path, overrides, field):
  config = gpt_causal.get_config('tiny')
  config.update(overrides)
  with pytest.raises(UnsupportedConfigError, match=field):
    huggingface.export_workdir(config, str(tmp_path / 'w'), str(tmp_path / 'out'))


def test_convert_command_both_ways_without_network(tmp_path):
  """The commands of the README, in a subprocess with the network switched off for Hugging Face."""
  torch.manual_seed(0)
  model, tokenizer = _gpt2()
  model.save_pretrained(tmp_path / 'hf')
  tokenizer.save_pretrained(tmp_path / 'hf')
  env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'launch.convert', *args], cwd=REPO_ROOT,
                                     env=env, capture_output=True, text=True, timeout=300)
  done = run(f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}')
  assert done.returncode == 0, done.stderr[-2000:]
  done = run(f'--workdir={tmp_path / "w"}', f'--to_hf={tmp_path / "out"}')
  assert done.returncode == 0, done.stderr[-2000:]
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'out')
  for name, value in model.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy())
  again = run(f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}')
  assert again.returncode != 0 and 'already holds checkpoints' in again.stderr
  assert 'Traceback' not in again.stderr


def test_pytorch_weights_file_is_read_as_data(tmp_path):
  """A folder with pytorch_model.bin instead of safetensors converts to the same parameters, and
  the file is loaded with weights_only=True: a pickle that would run code is refused."""
  torch.manual_seed(0)
  model, tokenizer = _gpt2()
  _randomize(model)
  for folder in ('safetensors', 'bin'):
    model.save_pretrained(tmp_path / folder)
    tokenizer.save_pretrained(tmp_path / folder)
  os.remove(tmp_path / 'bin' / 'model.safetensors')
  torch.save(model.state_dict(), tmp_path / 'bin' / 'pytorch_model.bin')
  from_bin = huggingface.read_weights(str(tmp_path / 'bin'))
  from_safetensors = huggingface.read_weights(str(tmp_path / 'safetensors'))
  assert from_bin.keys() >= from_safetensors.keys()
  for name, value in from_safetensors.items():
    np.testing.assert_array_equal(from_bin[name], value, err_msg=name)

  class RunsCode:  # unpickling this would call os.system
    def __reduce__(self):
      return (os.system, ('touch ' + str(tmp_path / 'pwned'),))
  torch.save({'x': RunsCode()}, tmp_path / 'bin' / 'pytorch_model.bin')
  with pytest.raises(UnsupportedConfigError, match='pytorch_model.bin is not a plain weights'):
    huggingface.read_weights(str(tmp_path / 'bin'))
  assert not (tmp_path / 'pwned').exists()
