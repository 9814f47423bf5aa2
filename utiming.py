import socket,time,statistics,random,sys
from cl import basic, connect
N=int(sys.argv[1]); port=22600
cases={"unknown":"nosuchuser","known(tuser)":"tuser","known(root,*)":"root"}
res={k:[] for k in cases}; n=0
order=[k for k in cases for _ in range(N)]; random.seed(2); random.shuffle(order)
for k in order:
    n+=1; s=socket.socket(); s.bind(("127.55.%d.%d"%(n//200,n%200+1),0)); s.settimeout(10); s.connect(("127.0.0.1",port))
    s.sendall(connect(b"Proxy-Authorization: Basic "+basic(cases[k],"wrong%d"%n)+b"\r\n"))
    t=time.perf_counter(); d=s.recv(100); res[k].append((time.perf_counter()-t)*1000); s.close()
for k,v in res.items(): print(k, len(v), "median %.2f ms p10 %.2f p90 %.2f"%(statistics.median(v), sorted(v)[len(v)//10], sorted(v)[len(v)*9//10]))
print(d[:12])
