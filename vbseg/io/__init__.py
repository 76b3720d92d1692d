"""I/O at the bottom: the image type and what needs only it (:mod:`~vbseg.io.image`), reading
every image file (:mod:`~vbseg.io.volume`, :mod:`~vbseg.io.itk_files`, :mod:`~vbseg.io.dicom`),
atomic writers (:mod:`~vbseg.io.writing`), output folders and their locks
(:mod:`~vbseg.io.result_folder`), delineated-case indexes (:mod:`~vbseg.io.cases`) and display
helpers. Nothing here imports a model, a method or the command line."""
