"""The WMT14 builder on tiny archives in the statmt layout: splits, order, and clear errors."""

import copy
import io
import logging
import tarfile

import pytest

from configs import original
from transformer import data, errors
from transformer.data import builders


def sgml(root: str, docs: list[list[str]]) -> str:
  """An SGML test-set file: <doc>s of <seg>s, one per line, ids restarting in each document."""
  lines = [f'<{root} setid="newstest2014" srclang="any">']
  for number, segs in enumerate(docs):
    lines += [f'<doc sysid="ref" docid="{number}-news" genre="news" origlang="de">', '<p>']
    lines += [f'<seg id="{i}">{seg}</seg>' for i, seg in enumerate(segs, 1)]
    lines += ['</p>', '</doc>']
  return '\n'.join(lines + [f'</{root}>', ''])


def text(*lines: str) -> str:
  return ''.join(line + '\n' for line in lines)


TEST_DE = [['Gutach: Noch mehr Sicherheit für Fußgänger',
            'Er sagte: &quot;AT&amp;T&quot; ist &lt;kein&gt; Name.'],
           ['Zweites Dokument, erster Satz.', 'Zweiter Satz.']]
TEST_EN = [['Gutach: Increased safety for pedestrians',
            'He said: &quot;AT&amp;T&quot; is &lt;no&gt; name.'],
           ['Second document, first sentence.', 'Second sentence.']]
# Each archive with the members the builder reads, in the statmt layout, after decoys it must skip.
ARCHIVES = {
    'training-parallel-europarl-v7.tgz': {
        'training/europarl-v7.fr-en.fr': text('Reprise de la session'),
        'training/europarl-v7.de-en.de': text('Wiederaufnahme der Sitzungsperiode', '',
                                              '  Bitte erheben Sie sich.  '),
        'training/europarl-v7.de-en.en': text('Resumption of the session', 'A lone English side',
                                              'Please rise.'),
        'training/europarl-v7.fr-en.en': text('Resumption of the session')},
    'training-parallel-commoncrawl.tgz': {
        'commoncrawl.fr-en.fr': text('Bonjour'),
        'commoncrawl.de-en.annotation': text('web'),
        'commoncrawl.de-en.de': text('Die Straße in Köln ist schön.'),
        'commoncrawl.de-en.en': text('The street in Cologne is beautiful.')},
    'training-parallel-nc-v9.tgz': {
        'training/news-commentary-v9.cs-en.en': text('Czech news'),
        'training/news-commentary-v9.de-en.de': text('Gold für 10.000 Dollar?', 'Ende'),
        'training/news-commentary-v9.de-en.en': text('$10,000 Gold?', 'End')},
    'dev.tgz': {
        'dev/newstest2012.de': text('Alte Nachrichten'),
        'dev/newstest2013.de': text('Eine Republikanische Strategie', 'Zweiter Satz'),
        'dev/newstest2013.en': text('A Republican strategy', 'Second sentence')},
    'test-full.tgz': {
        'test-full/newstest2014-fren-src.fr.sgm': sgml('srcset', [['Les nouvelles']]),
        'test-full/newstest2014-deen-src.de.sgm': sgml('srcset', TEST_DE),
        'test-full/newstest2014-deen-ref.en.sgm': sgml('refset', TEST_EN),
        'test-full/newstest2014-deen-src.en.sgm': sgml('srcset', TEST_EN),
        'test-full/newstest2014-deen-ref.de.sgm': sgml('refset', TEST_DE)},
}
EXPECTED = {
    'train': [('Wiederaufnahme der Sitzungsperiode', 'Resumption of the session'),
              ('Bitte erheben Sie sich.', 'Please rise.'),
              ('Die Straße in Köln ist schön.', 'The street in Cologne is beautiful.'),
              ('Gold für 10.000 Dollar?', '$10,000 Gold?'), ('Ende', 'End')],
    'validation': [('Eine Republikanische Strategie', 'A Republican strategy'),
                   ('Zweiter Satz', 'Second sentence')],
    'test': [('Gutach: Noch mehr Sicherheit für Fußgänger',
              'Gutach: Increased safety for pedestrians'),
             ('Er sagte: "AT&T" ist <kein> Name.', 'He said: "AT&T" is <no> name.'),
             ('Zweites Dokument, erster Satz.', 'Second document, first sentence.'),
             ('Zweiter Satz.', 'Second sentence.')],
}


def write_tgz(path, members: dict[str, str]):
  with tarfile.open(path, 'w:gz') as tar:
    for name, content in members.items():
      encoded = content.encode('utf-8')
      info = tarfile.TarInfo(name)
      info.size = len(encoded)
      tar.addfile(info, io.BytesIO(encoded))


def wmt14_config(tmp_path, changes: dict | None = None, **overrides):
  """original:tiny on dataset=wmt14 with the archives in tmp_path/raw/wmt14/.

  changes: {archive: {member: new content, or None to leave the member out}}.
  """
  archives = copy.deepcopy(ARCHIVES)
  for archive, members in (changes or {}).items():
    archives[archive].update(members)
  folder = tmp_path / 'raw' / 'wmt14'
  folder.mkdir(parents=True)
  for archive, members in archives.items():
    write_tgz(folder / archive, {k: v for k, v in members.items() if v is not None})
  config = original.get_config('tiny')
  config.dataset, config.data_dir = 'wmt14', str(tmp_path / 'prepared')
  config.raw_data_dir = str(tmp_path / 'raw')
  for key, value in overrides.items():
    config[key] = value
  return config


def offline(url, timeout_s=10.0):
  raise OSError(f'{url} unreachable (simulated)')


def test_splits_hold_the_pairs_in_file_order(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = wmt14_config(tmp_path)
  for split, pairs in EXPECTED.items():
    assert [(e['de'], e['en']) for e in builders.load_split(config, split)] == pairs, split
  assert 'skipped 1 of 3 line pairs with an empty side' in caplog.text
  # Both directions translate; other languages are refused.
  assert data.load_text_pairs(config, 'validation') == EXPECTED['validation']
  config.source_lang, config.target_lang = 'en', 'de'
  assert data.load_text_pairs(config, 'validation') == [(en, de)
                                                        for de, en in EXPECTED['validation']]
  config.source_lang = 'fr'
  with pytest.raises(errors.ConfigError, match="wmt14 translates between de and en; got "
                     "source_lang='fr'"):
    data.load_text_pairs(config, 'validation')


def test_missing_archive_is_named_with_where_to_put_it(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, '_check_reachable', offline)
  config = wmt14_config(tmp_path)
  (tmp_path / 'raw' / 'wmt14' / 'dev.tgz').unlink()
  with pytest.raises(errors.MissingError, match=r'wmt14 \(missing dev\.tgz\)') as error:
    builders.prepare(config)
  assert 'DIR/wmt14/<file>' in str(error.value)
  assert '--config.raw_data_dir=DIR' in str(error.value)


def test_missing_member_names_archive_and_member(tmp_path):
  config = wmt14_config(tmp_path, {'training-parallel-nc-v9.tgz': {
      'training/news-commentary-v9.de-en.en': None}})
  with pytest.raises(errors.MissingError,
                     match=r'nc-v9\.tgz has no member training/news-commentary-v9\.de-en\.en\. '
                     r'Download https://www\.statmt\.org/wmt14/training-parallel-nc-v9\.tgz '
                     r'again, put it in a directory DIR as DIR/wmt14/training-parallel-nc-v9\.tgz '
                     r'and run with --config\.raw_data_dir=DIR\.'):
    builders.prepare(config)


def test_truncated_archive_is_named(tmp_path):
  config = wmt14_config(tmp_path)
  path = tmp_path / 'raw' / 'wmt14' / 'test-full.tgz'
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])
  with pytest.raises(errors.ConfigError,
                     match=r'test-full\.tgz: damaged or truncated archive .*DIR/wmt14/test-full'):
    builders.prepare(config)


class FakeDownloadManager:
  """Stands in for tfds' download manager: 'downloads' (never extracted) are local files."""

  def __init__(self, folder):
    self.folder = folder

  def download(self, urls: dict[str, str]) -> dict[str, str]:
    return {name: str(self.folder / name) for name in urls}


def test_downloads_stay_packed_and_known_checksums_are_checked(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, '_check_reachable', lambda url, timeout_s=10.0: None)
  wmt14_config(tmp_path)
  folder = tmp_path / 'raw' / 'wmt14'
  fetch = FakeDownloadManager(folder)
  with pytest.raises(errors.MissingError, match=r'checksum mismatch for '
                     r'https://www\.statmt\.org/wmt13/training-parallel-europarl-v7\.tgz'):
    builders.locate_raw_files('wmt14', 'wmt14', None, builders.WMT14_URLS, builders.WMT14_SHA256,
                              fetch, extract=False)
  sha256 = {name: expected and builders.file_sha256(folder / name)
            for name, expected in builders.WMT14_SHA256.items()}
  assert builders.locate_raw_files('wmt14', 'wmt14', None, builders.WMT14_URLS, sha256, fetch,
                                   extract=False) == {name: str(folder / name)
                                                      for name in builders.WMT14_URLS}


@pytest.mark.parametrize('archive, member, lines, message', [
    ('training-parallel-europarl-v7.tgz', 'training/europarl-v7.de-en.en',
     text('Resumption of the session', 'A lone English side', 'Please rise.', 'One too many'),
     r'europarl-v7\.tgz: training/europarl-v7\.de-en\.de ends after 3 lines, before '
     r'training/europarl-v7\.de-en\.en'),
    ('test-full.tgz', 'test-full/newstest2014-deen-ref.en.sgm', sgml('refset', TEST_EN[:1]),
     r'test-full\.tgz: test-full/newstest2014-deen-ref\.en\.sgm ends after 2 segments, before '
     r'test-full/newstest2014-deen-src\.de\.sgm'),
], ids=['lines', 'segments'])
def test_sides_of_different_lengths_are_refused(tmp_path, archive, member, lines, message):
  config = wmt14_config(tmp_path, {archive: {member: lines}})
  with pytest.raises(errors.ConfigError, match=message):
    builders.prepare(config)
