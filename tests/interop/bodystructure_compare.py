"""Fetches every message of the interop maildir from Dovecot and compares ENVELOPE,
BODY, BODYSTRUCTURE, RFC822.SIZE and the sections of our part table with mime_dump's
output. Structures are compared as parsed IMAP (so quoting and literal choices do not
count); strings are compared exactly, a difference in case only is reported as such.
Exit 1 when anything differs."""
import imaplib, json, socket, sys, time

port, ours_path = int(sys.argv[1]), sys.argv[2]
ours = [json.loads(l) for l in open(ours_path)]
for o in ours:
    o['raw'] = open(o['file'], 'rb').read()


def connect():
    # Dovecot forks its listeners after the master starts: wait for the port.
    deadline = time.monotonic() + 20
    while True:
        try:
            return imaplib.IMAP4('127.0.0.1', port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            socket.socket().close()


def raw_response(data):
    """imaplib's FETCH answer with its literals put back in place."""
    out = b''
    for item in data:
        if isinstance(item, tuple):
            out += item[0] + b'\r\n' + item[1]  # imaplib drops the CRLF
        elif item is not None:
            out += item
    return out


def parse(b, i=0):
    """One IMAP value from b at i: list, string (bytes), NIL (None), atom/number."""
    while b[i:i + 1] == b' ':
        i += 1
    c = b[i:i + 1]
    if c == b'(':
        i += 1
        items = []
        while True:
            while b[i:i + 1] == b' ':
                i += 1
            if i >= len(b):
                raise ValueError('unterminated list')
            if b[i:i + 1] == b')':
                return items, i + 1
            v, i = parse(b, i)
            items.append(v)
    if c == b'"':
        i += 1
        s = b''
        while b[i:i + 1] != b'"':
            if i >= len(b):
                raise ValueError('unterminated string')
            if b[i:i + 1] == b'\\':
                i += 1
            s += b[i:i + 1]
            i += 1
        return s, i + 1
    if c == b'{':
        j = b.index(b'}', i)
        n = int(b[i + 1:j])
        start = j + 3  # }\r\n
        return b[start:start + n], start + n
    j = i
    while j < len(b) and b[j:j + 1] not in b' ()':
        j += 1
    atom = b[i:j]
    return (None if atom.upper() == b'NIL' else ('atom', atom)), j


def item(resp, name):
    """The value of FETCH item `name` in one untagged FETCH response."""
    k = resp.index(b'(')  # imaplib drops the 'N FETCH' in front
    vals, _ = parse(resp, k)
    for a, v in zip(vals[::2], vals[1::2]):
        if a == ('atom', name.encode()):
            return v
    raise KeyError(name)


def diff(path, a, b, out):
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f'{path}: {len(a)} vs {len(b)} items: {a!r} vs {b!r}')
            return
        for n, (x, y) in enumerate(zip(a, b)):
            diff(f'{path}[{n}]', x, y, out)
    elif a != b:
        if isinstance(a, bytes) and isinstance(b, bytes) and a.lower() == b.lower():
            out.append(f'{path}: case only: ours {a!r}, dovecot {b!r}')
        else:
            out.append(f'{path}: ours {a!r}, dovecot {b!r}')


imap = connect()
imap.login('interop', 'interop')
imap.select('INBOX', readonly=True)
typ, data = imap.uid('SEARCH', None, 'ALL')
uids = data[0].split()
bad = 0
for uid in uids:
    full = raw_response(imap.uid('FETCH', uid, '(BODY.PEEK[])')[1])
    body = item(full, 'BODY[]')
    o = next((o for o in ours if o['raw'] == body), None)
    if o is None:
        print(f'uid {uid}: no corpus file has these bytes')
        bad += 1
        continue
    name = o['file'].rsplit('/', 1)[-1]
    problems = []
    for key, what in [('envelope', 'ENVELOPE'), ('body', 'BODY'),
                      ('bodystructure', 'BODYSTRUCTURE')]:
        resp = raw_response(imap.uid('FETCH', uid, f'({what})')[1])
        theirs = item(resp, what)
        mine, _ = parse(o[key].encode('latin-1'))
        diff(what, mine, theirs, problems)
    size = item(raw_response(imap.uid('FETCH', uid, '(RFC822.SIZE)')[1]), 'RFC822.SIZE')
    if int(size[1]) != o['size']:
        problems.append(f'RFC822.SIZE: ours {o["size"]}, dovecot {int(size[1])}')
    for section, mine in o['sections'].items():
        resp = raw_response(imap.uid('FETCH', uid, f'(BODY.PEEK[{section}])')[1])
        theirs = item(resp, f'BODY[{section}]')
        mine = mine.encode('latin-1')
        if theirs is None:
            theirs = b''
        if mine != theirs:
            problems.append(f'BODY[{section}]: ours {mine[:80]!r}… ({len(mine)}), '
                            f'dovecot {theirs[:80]!r}… ({len(theirs)})')
    print(f'{name}: {"same" if not problems else str(len(problems)) + " differences"}')
    for p in problems:
        print('   ', p)
    bad += bool(problems)
imap.logout()
print(f'{len(uids)} messages, {bad} with differences')
sys.exit(1 if bad else 0)
