"""Python pieces the bundles' configs point to, grouped by owner: ``common`` (what both bundles use),
``slice_cnn`` (the slice_cnn_brainage bundle's own) and ``tgb_gan`` (the tgb_gan_augment bundle's own)."""
