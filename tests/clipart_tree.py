"""A fake openclipart tree (svg/ + png/ with real-format RDF metadata, PNGs drawn with Pillow): what the
clip-art builder reads, without the Debian packages. Used by test_clipart_data and the experiment smoke test."""
from xml.sax.saxutils import escape

from PIL import Image, ImageDraw

NICU = "Clipart by Nicu Buculei - pear"
FLAT = "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)"
# path -> (title, description, keywords, author, image); image: a colour index, or "broken", "missing", "blank",
# or a path whose PNG bytes to copy. "copy:PATH" copies that drawing's SVG bytes too.
DRAWINGS = {
    "animals/mammals/deer_01": ("Deer", "A deer in the woods", ["animal", "mammal", "deer"], "Ann", 1),
    "animals/big cats/lion one": ("Lion", "", ["animal", "cat"], "Ann", 2),
    "animals/cat_01": ("Cat", "someone@example.com", ["hash", "hash(0x86a0bb0)", "Pet", "pet", "big_dog", None,
                                                      "Jane Doe", "cat"], "Jane Doe", 3),
    "people/skier_01": ("Čerešňa à la crème", "Lyžař na svahu", ["people"], "Petr", 4),
    "people/tree-man": ("tree", "Tree", ["people"], "Ann", 5),
    "people/quoted": ('The "Big" Apple\tPie', "HASH(0x85caca8)", ["people"], "Ann", 6),
    "food/fruit/pear": (NICU, "", ["fruit"], "Nicu", 7),
    "food/fruit/lemon": (NICU, "", ["fruit"], "Nicu", 8),
    "food/fruit/cherries": (NICU, "", ["fruit"], "Nicu", 9),
    "food/galette_01": ("galette", "See http://example.com/galette for the recipe", ["food"], "Bo", 10),
    "food/sugarbox_01": ("sugarbox", "", ["food"], "Bo", "food/galette_01"),
    "food/bread_01": ("Bread", "", ["food"], "Bo", 11),
    "computer/icons/a_icon": (FLAT, "", ["computer"], "Flat", 12),
    "computer/icons/b_icon": (FLAT, "", ["computer"], "Flat", 13),
    "computer/icons/c_icon": (FLAT, "", ["computer"], "Flat", 14),
    "computer/broken_monitor": ("Broken Monitor", "", ["computer"], "Cy", "broken"),
    "computer/keyboard": ("Keyboard", "", ["computer"], "Cy", "missing"),
    "computer/mouse_01": ("Mouse", "", ["computer"], "Cy", 15),
    "computer/screen_01": ("Screen", "", ["computer"], "Cy", 16),
    "people/nobody": ("", "", ["people"], "Ann", 17),
    "people/ghost": ("Ghost", "", ["people"], "Ann", "blank"),
    "people/na": ("NA", "", ["people"], "Ann", 18),
    "signs_and_symbols/deer_01": "copy:animals/mammals/deer_01",
    "signs_and_symbols/stop_sign": ("Stop Sign", "", ["sign"], "Di", 19),
    "signs_and_symbols/yield_sign": ("Yield Sign", "", ["sign"], "Di", 20),
}
SKIPS = {"boilerplate_title": 5, "no_title": 2, "png_unreadable": 1, "no_png": 1, "duplicate_svg": 1,
         "duplicate_image": 1, "blank_image": 1}
ARGS = ["--image-size", "16", "--heldout-frac", "0.5", "--min-class-size", "1"]

SVG = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/" width="40" height="30">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{description}</dc:description>
        <dc:subject>
          <rdf:Bag>{keywords}</rdf:Bag>
        </dc:subject>
        <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org"><dc:title>Open Clip Art Library</dc:title>
        </cc:Agent></dc:publisher>
        <dc:creator><cc:Agent><dc:title>{author}</dc:title></cc:Agent></dc:creator>
        <dc:format>image/svg+xml</dc:format>
        <cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect x="{index}" y="2" width="30" height="20" fill="#{index:02x}8040"/>
</svg>
"""


def _png(index: int) -> Image.Image:
    """A distinct drawing per index on a transparent page larger than the ink (RGBA, P and LA modes)."""
    image = Image.new("RGBA", (120, 90), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10 + index, 20, 60 + 2 * index, 70), fill=(20 * index % 256, 100, 200 - 5 * index, 255))
    draw.ellipse((30, 30 + index, 50, 50 + index), fill=(255, 255 - 10 * index, 0, 255))
    return image.convert("LA") if index % 5 == 0 else image.convert("P") if index % 4 == 0 else image


def write_tree(root):
    """svg/<path>.svg and png/<path>.png for every entry of DRAWINGS."""
    for path, spec in DRAWINGS.items():
        svg, png = root / "svg" / f"{path}.svg", root / "png" / f"{path}.png"
        svg.parent.mkdir(parents=True, exist_ok=True)
        png.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, str):
            source = spec.split(":", 1)[1]
            svg.write_bytes((root / "svg" / f"{source}.svg").read_bytes())
            png.write_bytes((root / "png" / f"{source}.png").read_bytes())
            continue
        title, description, keywords, author, image = spec
        bag = "".join("<rdf:li/>" if k is None else f"<rdf:li>{escape(k)}</rdf:li>" for k in keywords)
        index = image if isinstance(image, int) else 0
        svg.write_text(SVG.format(title=escape(title), description=escape(description), keywords=bag,
                                  author=escape(author), index=index), encoding="utf-8")
        if image == "broken":
            png.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        elif image == "blank":
            Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(png)
        elif isinstance(image, str) and image != "missing":
            png.write_bytes((root / "png" / f"{image}.png").read_bytes())
        elif isinstance(image, int):
            _png(image).save(png)
