"""Bytes to text: a corpus file's encoding (BOM, UTF-8, GB18030 or Big5, a web page's declared charset),
with the BOM removed and CRLF/CR turned into LF; empty, binary and undecodable files raise CorpusError."""
from __future__ import annotations

import codecs
import re
from functools import lru_cache
from pathlib import Path

from .errors import RagError


class CorpusError(RagError):
    """A corpus folder or file that cannot be used; the message is one line meant for a person."""


# UTF-32 before UTF-16: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)

# Big5 bytes are nearly always valid GBK and short GB text is often valid Big5 (or even UTF-8), so
# strict decoding alone cannot choose; a decoding is judged by how much of it is everyday Chinese.
# These are the 600 most frequent hanzi (character counts over jieba's dictionary) plus their
# traditional forms; the wider "common" set is built from the codecs themselves below.
_FREQUENT = (
    "一是人了不在有大中国和为这上他个地年来我会以到时要出的生学说道民家子也成行下们于后就发自之对得主长可过天作分方用多你着部"
    "能市等业全里工公经本都而高政法面门动日进区事代那去心小同北定开产前其军还然起种所如现理机体表力好外与文当两实重新三么只山"
    "水关明从化平建又制南内西没此将员名手最东头者月间无安看见各城十相但已些正口通想度加第她合院物性战由位常点海意场武使次二向"
    "治因立数样身情入原问把路被并利石老教万知级量任江及应省资委务元美特期世湖回系比气汉总展电科金先声提品设或义王社很统处四首"
    "共马形己儿司太目基领队直计别女权话少流命至报米给打变果书清活几州华解议更称程今决张导术府才保交放管结师便走达族反再题色五"
    "京河接条规式县白它改风光运信受什组听布百济党指论强做取技黄神选记斯真却职号界件花类何眼兵传带空干农边据集联古广完质阳难增"
    "历史专官每住商即步认车台林必死游举线言皇土团收考求德叫近备研争非具李众连调感转笑革该持始英克士尔让拉思根格造较际亲单朝红"
    "型价校约器字段周亚深候则功属积快图火千准究往极育装许参半令吃观鱼精办像帝八复影告远群包整构料随划算象容示投势热值夫网望源"
    "息语股铁断派速怎需片爱律纪支早况病境证编越局推满且列觉服双未居除乐企引标确织初青志率项飞球节察龙响药站施均消客失轻存低甚"
    "般击曾防请离落显罗营足素视护副食创余照兴占巴虽洲村费易试星木黑左宝置跟央识维采六底宫房音环案批切斗富乡另倒若按查故突责严"
    "國為這個來會時學說們於後發對長過著業裡經門動進區開產軍還種現機體與當兩實麼關從內沒將員東頭間無見戰點場數樣問並萬級應資務"
    "氣漢總電聲設義統處馬兒領隊計別權話報給變書幾華議稱決張導術結師達題條規縣風運組聽濟黨論強黃選記卻職號類傳帶幹農邊據聯廣質"
    "陽難歷專認車臺遊舉線團備爭眾連調轉該爾讓較際親單紅價約亞則屬積圖準極裝許參觀魚辦復遠構隨勢熱網語鐵斷愛紀況證編滿覺雙樂標"
    "確織項飛節龍響藥輕擊請離顯羅營視護創餘興佔雖費試寶識維採宮環鬥鄉責嚴"
)
_PUNCT = "、。〈〉《》「」『』【】〔〕〖〗…—–‘’“”·！（），．：；？［］｛｝～％＋－／　"


@lru_cache(maxsize=1)
def _common_chars() -> frozenset[str]:
    # GB2312 level 1 (3755 most used simplified hanzi) and Big5 level 1 (5401 common traditional ones).
    chars: set[str] = set(_PUNCT)
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            chars.update(bytes([hi, lo]).decode("gb2312", errors="ignore"))
    for hi in range(0xA4, 0xC7):
        for lo in [*range(0x40, 0x7F), *range(0xA1, 0xFF)]:
            if (hi, lo) > (0xC6, 0x7E):
                break
            chars.update(bytes([hi, lo]).decode("big5", errors="ignore"))
    return frozenset(chars)


def _plausibility(text: str) -> tuple[float, float]:
    """(coverage, weight) of the non-ASCII characters: share that is common hanzi or CJK punctuation,
    and the same with the most frequent hanzi counted double (halved back into 0..1).

    >>> _plausibility("学校举行报告会。")
    (1.0, 0.9375)
    >>> _plausibility("ѧУ")  # "学校" in GB18030 read as UTF-8
    (0.0, 0.0)
    """
    # A long prefix judges a whole file as well as all of it would, and a 20 MB file stays fast.
    chars = [c for c in text[:50_000] if ord(c) >= 0x80 and not c.isspace()]
    if not chars:
        return 0.0, 0.0
    common = _common_chars()
    known = [c for c in chars if c in common]
    frequent = sum(1 for c in known if c in _FREQUENT)
    return len(known) / len(chars), (len(known) + frequent) / (2 * len(chars))


def _legacy_candidate(data: bytes) -> tuple[str, str, float] | None:
    # Ties go to GB18030: mainland news is far more often GB than Big5.
    best: tuple[str, str, float] | None = None
    best_weight = -1.0
    for encoding in ("gb18030", "big5", "cp950"):
        if encoding == "cp950" and best is not None and best[1] == "big5":
            continue  # cp950 only extends Big5; try it only when plain Big5 failed
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        coverage, weight = _plausibility(text)
        if weight > best_weight:
            best, best_weight = (text, encoding, coverage), weight
    return best


def _looks_legacy(utf8_text: str) -> bool:
    """Whether valid UTF-8 text is more likely GB or Big5 bytes that happen to be valid UTF-8.

    >>> _looks_legacy("ѧУ"), _looks_legacy("Café"), _looks_legacy("学校")
    (True, False, False)
    """
    # Short GB text can be valid UTF-8 ("学校" = D1A7 D0A3 reads as "ѧУ"). Real UTF-8 Chinese always has
    # characters from U+0800 up, and real UTF-8 text below that ("Café", "20°C") comes with ASCII letters.
    non_ascii = [c for c in utf8_text if ord(c) >= 0x80]
    if not non_ascii or any(ord(c) >= 0x800 for c in non_ascii):
        return False
    return not any(c.isascii() and c.isalpha() for c in utf8_text)


def normalize_newlines(text: str) -> str:
    """Drop the leading BOM (files saved twice can have two) and turn CRLF and CR into LF.

    >>> normalize_newlines("\\ufeff标题\\r\\n正文\\r结尾")
    '标题\\n正文\\n结尾'
    """
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Decode a file's bytes to (text, encoding): BOM first, then strict UTF-8, then the more plausible
    of GB18030 and Big5. The BOM is removed and CRLF/CR become LF. Raises CorpusError when empty,
    binary or undecodable.

    >>> decode_bytes("学校\\r\\n".encode("gb18030"))
    ('学校\\n', 'gb18030')
    >>> decode_bytes("學校舉行報告會".encode("big5"))
    ('學校舉行報告會', 'big5')
    """
    if not data:
        raise CorpusError("empty file")
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                raise CorpusError(f"undecodable: invalid {encoding.upper()} after its byte order mark") from None
            return _checked(text, encoding)
    if b"\x00" in data:
        raise CorpusError("binary file (contains NUL bytes)")
    try:
        utf8: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        utf8 = None
    if utf8 is not None and not _looks_legacy(utf8):
        return _checked(utf8, "utf-8")
    legacy = _legacy_candidate(data)
    if utf8 is not None:
        if legacy is not None and legacy[2] >= 0.9:
            return _checked(legacy[0], legacy[1])
        return _checked(utf8, "utf-8")
    if legacy is None:
        raise CorpusError("undecodable: not UTF-8, GB18030 or Big5 text")
    if legacy[2] < 0.6:
        raise CorpusError("undecodable: does not look like UTF-8, GB18030 or Big5 Chinese text")
    return _checked(legacy[0], legacy[1])


def _checked(text: str, encoding: str) -> tuple[str, str]:
    text = normalize_newlines(text)
    if not text.strip():
        raise CorpusError("empty file")
    return text, encoding


def read_text(path: Path) -> tuple[str, str]:
    """(text, encoding) of one file; CorpusError naming the file when it is unreadable, empty, binary
    or undecodable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return decode_bytes(data)
    except CorpusError as e:
        raise CorpusError(f"{path}: {e}") from None


# The charset of a <meta charset=…>, <meta http-equiv content="…; charset=…"> or <?xml encoding=…?>.
# Browsers only look at the first 1024 bytes (WHATWG "prescan"); saved pages often put comments first.
_DECLARED_CHARSET = re.compile(
    rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)|^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9_.:-]+)""",
    re.I,
)
# WHATWG Encoding Standard labels: every GB label means the GB18030 decoder; Big5 labels mean Big5 with
# the HKSCS and Microsoft extensions, which Python splits over three codecs.
_GB_LABELS = {"gb2312", "gbk", "x-gbk", "gb18030", "chinese", "csgb2312", "iso-ir-58", "gb_2312", "gb_2312-80",
              "csiso58gb231280", "cp936", "windows-936"}  # fmt: skip
_BIG5_LABELS = {"big5", "big5-hkscs", "big5hkscs", "cn-big5", "csbig5", "x-x-big5", "cp950", "ms950", "windows-950"}


def _declared_codecs(data: bytes) -> tuple[str, ...]:
    """Python codecs to try for the charset a page declares, most likely first; () when none is declared
    or Python does not know it.

    >>> _declared_codecs(b'<html><head><meta charset="GBK">')
    ('gb18030',)
    >>> _declared_codecs(b'<meta http-equiv="Content-Type" content="text/html; charset=big5">')
    ('big5', 'cp950', 'big5hkscs')
    """
    m = _DECLARED_CHARSET.search(data[:4096])
    if not m:
        return ()
    label = (m.group(1) or m.group(2)).decode("ascii").lower()
    if label in _GB_LABELS:
        return ("gb18030",)
    if label in _BIG5_LABELS:
        return ("big5", "cp950", "big5hkscs")
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return ()
    # A declared UTF-16/32 cannot be right when the declaration itself reads as ASCII (WHATWG says UTF-8).
    return ("utf-8",) if name.startswith(("utf-16", "utf-32")) else (name,)


def decode_html(data: bytes) -> tuple[str, str]:
    """Decode a saved web page to (text, encoding): a BOM wins, then the page's declared charset, then
    the byte detection of decode_bytes. Raises CorpusError when empty, binary or undecodable.

    >>> decode_html('<meta charset="gbk"><p>学校</p>'.encode("gbk"))
    ('<meta charset="gbk"><p>学校</p>', 'gb18030')
    """
    declared = _declared_codecs(data)
    if not data or b"\x00" in data or data.startswith(tuple(bom for bom, _ in _BOMS)) or not declared:
        return decode_bytes(data)
    if declared[0] not in ("utf-8", "gb18030", "big5"):
        # A Chinese page declaring iso-8859-1 or windows-1252 is a classic server misconfiguration: the
        # bytes are GB or UTF-8, and trusting the label would index mojibake.
        try:
            return decode_bytes(data)
        except CorpusError:
            pass
    elif declared[0] != "utf-8":
        # A page re-saved as UTF-8 often keeps its old GBK declaration, while real GB or Big5 Chinese is
        # practically never valid UTF-8; so valid UTF-8 with Chinese in it beats the label.
        try:
            utf8 = data.decode("utf-8")
            if any(ord(c) >= 0x800 for c in utf8):
                return _checked(utf8, "utf-8")
        except UnicodeDecodeError:
            pass
    for codec in declared:
        try:
            return _checked(data.decode(codec), codec)
        except UnicodeDecodeError:
            continue
    return decode_bytes(data)  # the label was wrong; detect as for any text file
