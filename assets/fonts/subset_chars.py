# Characters kept in the bundled font subset (see README.md).
chars=set(chr(c) for c in range(0x20,0x7f))
chars|=set("·×±–—‘’“”…•→←↑↓≤≥≈°µ½")
chars|=set(chr(c) for c in range(0x3000,0x3020))
chars|=set(chr(c) for c in range(0xff01,0xff5f))
for hi in range(0xb0,0xf8):
    for lo in range(0xa1,0xff):
        try: chars.add(bytes([hi,lo]).decode('gb2312'))
        except UnicodeDecodeError: pass
open('chars.txt','w').write(''.join(sorted(chars)))
print(len(chars))
