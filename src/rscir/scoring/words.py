"""Default word lists for the contrastive-PCA projection (:mod:`rscir.scoring.basis`).

BASIC (Psomas et al., NeurIPS 2025) keeps the directions of an *object* corpus and removes those
of a *style* corpus. Its lists are about photographs and paintings of things; these are about
overhead imagery: the objects and land covers an aerial or satellite tile shows, and the
nuisances a tile varies by (sensor, resolution, radiometry, season, time of day, weather, view).
They were written once, by hand, from general remote-sensing vocabulary (land-cover and scene
classes of the common RS datasets), not chosen on any benchmark. Users pass their own lists
through :class:`rscir.scoring.methods.FusionOptions` (``objects=``, ``styles=``).
"""

from __future__ import annotations

RS_OBJECTS: tuple[str, ...] = (
    "airplanes", "airport", "apron", "baseball diamond", "basketball court", "beach",
    "bare soil", "boats", "bridge", "buildings", "bushes", "cars", "chaparral", "church",
    "circular farmland", "coastline", "commercial area", "container yard", "crops", "dam",
    "dense residential area", "desert", "docks", "factory", "farmland", "fields",
    "football field", "forest", "freeway", "golf course", "grass", "greenhouses",
    "ground track field", "harbor", "helipad", "highway", "houses", "industrial area",
    "intersection", "island", "lake", "meadow", "medium residential area", "mobile homes",
    "mountain", "oil tanks", "orchard", "overpass", "palace", "parking lot", "pavement", "pier",
    "playground", "pond", "power station", "quarry", "railway", "railway station",
    "rectangular farmland", "residential area", "river", "roads", "roundabout", "runway", "sand",
    "school", "sea", "ships", "shrubland", "snow", "solar panels", "sparse residential area",
    "stadium", "storage tanks", "swimming pool", "tennis courts", "terraces", "trees",
    "vegetation", "vineyard", "warehouse", "wastewater treatment plant", "water", "wetland",
    "wind turbines",
)

RS_STYLES: tuple[str, ...] = (
    "aerial photograph", "satellite image", "drone photograph", "overhead view", "oblique view",
    "top-down view", "high resolution image", "low resolution image", "blurry image",
    "sharp image", "noisy image", "compressed image with artifacts", "grayscale image",
    "black and white photo", "false colour image", "infrared image", "sepia tone",
    "overexposed image", "underexposed image", "dark image", "bright image", "high contrast",
    "low contrast", "saturated colours", "muted colours", "washed out colours", "greenish tint",
    "bluish tint", "reddish tint", "yellowish tint", "at sunrise", "at sunset", "at noon",
    "at night", "in summer", "in winter", "in spring", "in autumn", "on a cloudy day",
    "on a sunny day", "hazy", "foggy", "long shadows", "soft shadows", "sun glint",
    "scan lines", "sensor stripes", "vignetting", "painting", "sketch", "map", "illustration",
    "photo", "old photograph", "modern photograph", "film grain",
)
