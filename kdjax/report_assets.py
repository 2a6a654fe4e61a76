"""The HTML report's inline stylesheet and script (kdjax/report.py).

The script sorts and filters the gallery's cards (``div.card`` with ``data-cat``,
``data-type``, ``data-kind``, ``data-score``, ``data-mis``, ``data-dec``,
``data-name``) from the URL hash (``#cat=..&type=..&kind=..&mis=1&dec=..&sort=..``);
the controls (``#f-cat``, ``#f-type``, ``#f-kind``, ``#f-mis``, ``#f-dec``, ``#f-sort``)
write the hash and re-render at once; ``#cards[data-visible]`` and ``#n-visible`` give
the number of visible cards.
"""

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1400px;padding:0 16px 40px;color:#222;background:#fafafa}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.meta,.note{color:#555}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:8px}
table{border-collapse:collapse;background:#fff;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f0f0f0}
tbody th{text-align:left}tr.mean th,tr.mean td{font-weight:bold}.paper{color:#666;font-style:italic}
.curves{display:flex;flex-wrap:wrap;gap:10px}.curve{background:#fff;border:1px solid #ddd}
.curve .t{font-size:12px;font-weight:bold}.curve .a{font-size:10px;fill:#444}.curve .l{font-size:10px}
.controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;position:sticky;top:0;
background:#fafafa;padding:8px 0;z-index:1;border-bottom:1px solid #ddd}
#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px;margin-top:10px}
.card{background:#fff;border:2px solid #ddd;border-radius:4px;padding:4px}
.card.mis{border-color:#d62728}.card[hidden]{display:none}
.card img{width:100%;image-rendering:auto;display:block;background:#eee;min-height:60px}
.cap{font-size:12px}.cap .name{word-break:break-all}.bad{color:#d62728}.ok{color:#2ca02c}
.dec{font-weight:bold}
"""

JS = """
(function(){
  var cards=document.getElementById('cards'); if(!cards) return;
  var all=Array.prototype.slice.call(cards.querySelectorAll('.card'));
  all.forEach(function(c,i){c.dataset.order=i;});
  var catOrder={}; all.forEach(function(c){ if(!(c.dataset.cat in catOrder)) catOrder[c.dataset.cat]=Object.keys(catOrder).length; });
  var ids={cat:'f-cat',type:'f-type',kind:'f-kind',mis:'f-mis',dec:'f-dec',sort:'f-sort'};
  function el(k){return document.getElementById(ids[k]);}
  function readHash(){
    var s={cat:'',type:'',kind:'',mis:'',dec:'',sort:'score-desc'};
    location.hash.replace(/^#/,'').split('&').forEach(function(p){
      if(!p) return; var kv=p.split('='); var k=decodeURIComponent(kv[0]);
      if(k in s) s[k]=decodeURIComponent(kv.slice(1).join('=')||'');});
    return s;
  }
  function writeHash(){
    var parts=[];
    Object.keys(ids).forEach(function(k){
      var e=el(k); if(!e) return;
      var v=e.type==='checkbox'?(e.checked?'1':''):e.value;
      if(v && !(k==='sort' && v==='score-desc')) parts.push(k+'='+encodeURIComponent(v));});
    var h=parts.join('&');
    if(('#'+h)!==location.hash && !(h===''&&location.hash==='')) location.hash=h;
    render();  // at once (the hashchange event renders again, the same)
  }
  function render(){
    var s=readHash();
    Object.keys(ids).forEach(function(k){var e=el(k); if(!e) return;
      if(e.type==='checkbox') e.checked=(s[k]==='1'); else e.value=s[k];});
    var shown=all.filter(function(c){
      var d=c.dataset;
      return (!s.cat||d.cat===s.cat)&&(!s.type||d.type===s.type)&&(!s.kind||d.kind===s.kind)
        &&(s.mis!=='1'||d.mis==='1')&&(s.dec===''||(d.dec||'')===s.dec);});
    var key=s.sort;
    all.sort(function(a,b){
      var ca=catOrder[a.dataset.cat]-catOrder[b.dataset.cat]; if(ca) return ca;
      if(key==='name') return a.dataset.name<b.dataset.name?-1:(a.dataset.name>b.dataset.name?1:0);
      var d=parseFloat(a.dataset.score)-parseFloat(b.dataset.score);
      if(key==='score-desc') d=-d; return d||(a.dataset.order-b.dataset.order);});
    all.forEach(function(c){cards.appendChild(c); c.hidden=shown.indexOf(c)<0;});
    cards.dataset.visible=shown.length;
    var n=document.getElementById('n-visible');
    if(n) n.textContent=shown.length+' of '+all.length+' images';
    document.querySelectorAll('.curves').forEach(function(c){
      c.hidden=!!(s.cat&&c.dataset.cat!==s.cat);});
  }
  Object.keys(ids).forEach(function(k){var e=el(k); if(e) e.addEventListener('change',writeHash);});
  window.addEventListener('hashchange',render);
  render();
})();
"""
